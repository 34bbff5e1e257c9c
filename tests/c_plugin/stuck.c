/* A C plugin that misbehaves in one call, chosen at compile time, for the
 * deadline and create-error tests. Without a define it is a well-behaved
 * pusher and checker that refuses settings that are not an object or carry
 * the conformance kit's unknown key, delivers every push and reports every
 * fingerprint missing.
 *   -DNULL_INSTANCE      create answers RQ_OK but hands back no instance.
 *   -DNULL_INSTANCE_MSG  the same, with a message of its own.
 *   -DHANG_CREATE        create never returns.
 *   -DHANG_PUSH          push never returns.
 *   -DHANG_CHECK         check never returns.
 *   -DHANG_DESTROY       destroy never returns. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "retryq_plugin.h"

static RqBuf make_buf(const char *text) {
    RqBuf b;
    b.len = strlen(text);
    b.cap = b.len;
    b.ptr = (uint8_t *)malloc(b.len ? b.len : 1);
    memcpy(b.ptr, text, b.len);
    return b;
}

static void hang(void) {
    for (;;) sleep(3600);
}

static int contains(const uint8_t *hay, size_t len, const char *needle) {
    size_t n = strlen(needle);
    for (size_t i = 0; i + n <= len; i++)
        if (memcmp(hay + i, needle, n) == 0) return 1;
    return 0;
}

static int32_t stuck_create(uint32_t kind, const uint8_t *settings, size_t len,
                            const RqHostCallbacks *host, void **out, RqBuf *err) {
    (void)kind; (void)host;
#ifdef HANG_CREATE
    hang();
#endif
    if (len == 0 || settings[0] != '{' || contains(settings, len, "retryq_conformance_unknown_key")) {
        *err = make_buf("stuck: settings refused");
        return RQ_BAD_CONFIG;
    }
#if defined(NULL_INSTANCE_MSG)
    (void)out;
    *err = make_buf("stuck: out of instances");
    return RQ_OK;
#elif defined(NULL_INSTANCE)
    (void)out;
    return RQ_OK;
#else
    *out = malloc(1);
    return RQ_OK;
#endif
}

static int32_t stuck_push(void *inst, const uint8_t *meta, size_t meta_len, const uint8_t *payload,
                          size_t payload_len, uint64_t deadline, RqPushResult *out) {
    (void)inst; (void)meta; (void)meta_len; (void)payload; (void)payload_len; (void)deadline;
#ifdef HANG_PUSH
    hang();
#endif
    out->retry_after_ms = -1;
    out->status = RQ_OK;
    out->message = make_buf("");
    return RQ_OK;
}

static int32_t stuck_check(void *inst, const uint8_t *fps, size_t len, uint64_t deadline, RqBuf *out) {
    (void)inst; (void)fps; (void)len; (void)deadline;
#ifdef HANG_CHECK
    hang();
#endif
    *out = make_buf("{\"existing\":[],\"missing\":[]}");
    return RQ_OK;
}

static void stuck_destroy(void *inst) {
#ifdef HANG_DESTROY
    hang();
#endif
    free(inst);
}

static void stuck_free(RqBuf b) { free(b.ptr); }

static const RqPluginTable TABLE = {
    RQ_ABI_VERSION, (uint32_t)sizeof(RqPluginTable),
    "stuck", "0.1.0", RQ_KIND_PUSHER | RQ_KIND_CHECKER,
    stuck_create, stuck_push, stuck_check, stuck_destroy, stuck_free,
};

const RqPluginTable *retryq_plugin_entry_v1(void) { return &TABLE; }
