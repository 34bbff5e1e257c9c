/*
 * retryq plugin ABI, version 1 -- the C view of retryq_plugin::abi.
 *
 * A plugin is a shared library exporting one function:
 *
 *     const RqPluginTable *retryq_plugin_entry_v1(void);
 *
 * returning a pointer to a static table. Rules:
 *  - The table starts with abi_version and struct_size; later ABI versions
 *    only append fields. Set struct_size = sizeof(RqPluginTable).
 *  - Item metadata and fingerprint lists are UTF-8 JSON; payloads are raw
 *    bytes. Do not keep pointers the host passed after a call returns.
 *  - Buffers the plugin returns (RqBuf) are freed by the host calling the
 *    plugin's free_buffer: whoever allocates frees.
 *  - Every call returns a status code. Never let an exception or a longjmp
 *    cross the boundary.
 *  - Instances may be called from several host threads at once: make push
 *    and check thread-safe.
 *  - deadline_unix_ms: wall-clock milliseconds since the Unix epoch after
 *    which the host stops waiting (a late call counts as retryable).
 *
 * Evolution rules (a plugin built from the frozen 1.0 copy of this header,
 * tests/abi/v1/, must load and pass the conformance checks in every host):
 *  - Fields of RqPluginTable and RqHostCallbacks are only ever appended:
 *    never removed, reordered or retyped.
 *  - Every appended field is optional: NULL / 0 means absent. A host reads a
 *    table field only if the plugin's struct_size reaches it, so an older
 *    (shorter) table loads with the newer fields absent, and a newer
 *    (longer) table loads with the fields this host does not know ignored.
 *  - Likewise a plugin reads a host callback only if the host's
 *    RqHostCallbacks.struct_size reaches it.
 *  - Fields up to free_buffer (the 1.0 table) are required.
 *  - Anything else is a new abi_version with a new entry symbol.
 */
#ifndef RETRYQ_PLUGIN_H
#define RETRYQ_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RQ_ABI_VERSION 1u

/* Status codes. */
#define RQ_OK 0           /* delivered / checked / created */
#define RQ_RETRYABLE 1    /* transient failure; see retry_after_ms */
#define RQ_PERMANENT 2    /* the upstream refuses this item for good */
#define RQ_UNAUTHORIZED 3 /* credentials refused: the host pauses delivery */
#define RQ_BAD_CONFIG 4   /* create: settings refused (message in out_error) */
#define RQ_PANICKED 5     /* internal failure: the host recreates the instance */

/* Instance kinds (bits of RqPluginTable.kinds). */
#define RQ_KIND_PUSHER 1u
#define RQ_KIND_CHECKER 2u

/* Log levels for RqHostCallbacks.log. */
#define RQ_LOG_ERROR 1
#define RQ_LOG_WARN 2
#define RQ_LOG_INFO 3
#define RQ_LOG_DEBUG 4

/* A buffer allocated by the plugin; the host frees it with free_buffer. */
typedef struct RqBuf {
    uint8_t *ptr;
    size_t len;
    size_t cap; /* opaque to the host: for the plugin's allocator */
} RqBuf;

/* The answer to one push. message is freed by the host with free_buffer. */
typedef struct RqPushResult {
    int32_t status;
    int64_t retry_after_ms; /* with RQ_RETRYABLE: Retry-After in ms, or -1 */
    RqBuf message;
} RqPushResult;

/* Functions the host lends the plugin; valid for the life of the process. */
typedef struct RqHostCallbacks {
    uint32_t struct_size;
    /* Logs into the host's logs, tagged with the plugin's name. May be NULL. */
    void (*log)(int32_t level, const uint8_t *msg, size_t len);
} RqHostCallbacks;

typedef struct RqPluginTable {
    uint32_t abi_version; /* RQ_ABI_VERSION */
    uint32_t struct_size; /* sizeof(RqPluginTable) */
    const char *name;     /* NUL-terminated, static */
    const char *version;  /* NUL-terminated, static */
    uint32_t kinds;       /* RQ_KIND_* bits */

    /* Creates an instance of `kind` from JSON settings and stores it in
     * *out_instance (never NULL with RQ_OK: the host reports that as a
     * failure). On failure write a message into *out_error and return
     * RQ_BAD_CONFIG (the settings are refused) or RQ_PANICKED. */
    int32_t (*create)(uint32_t kind, const uint8_t *settings, size_t settings_len,
                      const RqHostCallbacks *host, void **out_instance, RqBuf *out_error);

    /* Pushes one item: meta_json is the item's metadata (id, type,
     * fingerprint, attempts, max_attempts, created_at, agent_id,
     * scanner_name, target_path, attributes); payload the compact JSON report.
     * Fill *out and return its status. */
    int32_t (*push)(void *instance, const uint8_t *meta_json, size_t meta_len,
                    const uint8_t *payload, size_t payload_len, uint64_t deadline_unix_ms,
                    RqPushResult *out);

    /* Checks fingerprints: input a JSON array of strings. On RQ_OK write
     * {"existing":[...],"missing":[...]} into *out; otherwise a message. */
    int32_t (*check)(void *instance, const uint8_t *fingerprints_json, size_t len,
                     uint64_t deadline_unix_ms, RqBuf *out);

    /* Destroys an instance (no call is in progress). */
    void (*destroy)(void *instance);

    /* Frees a buffer this plugin returned. */
    void (*free_buffer)(RqBuf buf);

    /* ---- appended after 1.0: optional (NULL = absent) ---- */

    /* A one-line description, NUL-terminated, static; or NULL. */
    const char *description;
} RqPluginTable;

const RqPluginTable *retryq_plugin_entry_v1(void);

#ifdef __cplusplus
}
#endif

#endif /* RETRYQ_PLUGIN_H */
