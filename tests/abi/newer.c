/* A plugin from a future release: built against today's header, its table
 * carries today's fields and two more appended after them that no host
 * knows yet. A host must load it, read what it knows (the description) and
 * ignore the rest. */
#include <stdlib.h>
#include <string.h>
#include "retryq_plugin.h"

typedef struct FutureTable {
    RqPluginTable today;
    uint64_t future_flags;           /* appended by a later release */
    void (*future_hook)(void);       /* appended by a later release */
} FutureTable;

static RqBuf empty(void) { RqBuf b = {NULL, 0, 0}; return b; }

static int32_t f_create(uint32_t kind, const uint8_t *s, size_t len, const RqHostCallbacks *host,
                        void **out, RqBuf *err) {
    (void)kind; (void)s; (void)len; (void)host; (void)err;
    *out = malloc(1);
    return RQ_OK;
}
static int32_t f_push(void *i, const uint8_t *m, size_t ml, const uint8_t *p, size_t pl, uint64_t d,
                      RqPushResult *out) {
    (void)i; (void)m; (void)ml; (void)p; (void)pl; (void)d;
    out->status = RQ_OK; out->retry_after_ms = -1; out->message = empty();
    return RQ_OK;
}
static int32_t f_check(void *i, const uint8_t *f, size_t l, uint64_t d, RqBuf *out) {
    (void)i; (void)f; (void)l; (void)d; *out = empty(); return RQ_RETRYABLE;
}
static void f_destroy(void *i) { free(i); }
static void f_free(RqBuf b) { free(b.ptr); }
static void f_hook(void) { abort(); /* a host that called it would die */ }

static const FutureTable TABLE = {
    { RQ_ABI_VERSION, (uint32_t)sizeof(FutureTable), "abi-future", "9.0.0", RQ_KIND_PUSHER,
      f_create, f_push, f_check, f_destroy, f_free, "a plugin from the future" },
    0xffffffffffffffffull, f_hook,
};

const RqPluginTable *retryq_plugin_entry_v1(void) { return &TABLE.today; }
