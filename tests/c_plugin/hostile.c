/* A hostile plugin for the isolation tests: each push looks for a word in
 * its payload and misbehaves as it says; any other payload is delivered.
 *   "segv"     dereferences NULL (SIGSEGV)
 *   "abort"    calls abort() (SIGABRT)
 *   "exit"     calls exit(3) in the middle of the call
 *   "loop"     spins forever
 *   "alloc"    allocates and touches memory without bound
 *   "status"   returns status 77, which means nothing
 *   "utf8"     answers retryable with a message that is not UTF-8
 *   "nullbuf"  answers retryable with a NULL message of length 5
 *   "slow"     takes 300 ms first (to have calls in flight)
 *   "linger"   takes 500 ms first
 * Every push logs one line through the host callback ("hostile push").
 * Settings containing "refuse" make create fail. Built with -DALWAYS='"word"'
 * every push behaves as if its payload held that word. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "retryq_plugin.h"

static const RqHostCallbacks *HOST;

static int contains(const uint8_t *hay, size_t len, const char *needle) {
    size_t n = strlen(needle);
#ifdef ALWAYS
    if (strcmp(needle, ALWAYS) == 0) return 1;
#endif
    for (size_t i = 0; i + n <= len; i++)
        if (memcmp(hay + i, needle, n) == 0) return 1;
    return 0;
}

static RqBuf make_buf(const char *bytes, size_t len) {
    RqBuf b;
    b.len = len;
    b.cap = len;
    b.ptr = (uint8_t *)malloc(len ? len : 1);
    memcpy(b.ptr, bytes, len);
    return b;
}

static int32_t h_create(uint32_t kind, const uint8_t *settings, size_t len,
                        const RqHostCallbacks *host, void **out, RqBuf *err) {
    (void)kind;
    if (contains(settings, len, "refuse")) {
        *err = make_buf("hostile: refusing create", 24);
        return RQ_BAD_CONFIG;
    }
    HOST = host;
    *out = malloc(1);
    return RQ_OK;
}

static int32_t h_push(void *inst, const uint8_t *meta, size_t meta_len, const uint8_t *p,
                      size_t n, uint64_t deadline, RqPushResult *out) {
    (void)inst; (void)meta; (void)meta_len; (void)deadline;
    if (HOST && HOST->struct_size >= sizeof(RqHostCallbacks) && HOST->log)
        HOST->log(RQ_LOG_WARN, (const uint8_t *)"hostile push", 12);
    out->retry_after_ms = -1;
    out->message.ptr = NULL; out->message.len = 0; out->message.cap = 0;
    if (contains(p, n, "slow")) usleep(300 * 1000);
    if (contains(p, n, "linger")) usleep(500 * 1000);
    if (contains(p, n, "segv")) { volatile int *null = NULL; *null = 1; }
    if (contains(p, n, "abort")) abort();
    if (contains(p, n, "exit")) exit(3);
    if (contains(p, n, "loop")) { volatile unsigned long spin = 0; for (;;) spin++; }
    if (contains(p, n, "alloc")) {
        for (;;) {
            char *block = (char *)malloc(1 << 20);
            memset(block, 1, 1 << 20); /* unchecked: NULL here is a crash */
        }
    }
    if (contains(p, n, "status")) { out->status = 77; return 77; }
    if (contains(p, n, "utf8")) {
        out->status = RQ_RETRYABLE;
        out->message = make_buf("bad \xff\xfe bytes", 12);
        return RQ_RETRYABLE;
    }
    if (contains(p, n, "nullbuf")) {
        out->status = RQ_RETRYABLE;
        out->message.len = 5; /* ptr stays NULL */
        return RQ_RETRYABLE;
    }
    out->status = RQ_OK;
    return RQ_OK;
}

static int32_t h_check(void *inst, const uint8_t *fps, size_t len, uint64_t deadline, RqBuf *out) {
    (void)inst; (void)fps; (void)len; (void)deadline;
    *out = make_buf("no checker", 10);
    return RQ_RETRYABLE;
}

static void h_destroy(void *inst) { free(inst); }
static void h_free(RqBuf b) { free(b.ptr); }

static const RqPluginTable TABLE = {
    RQ_ABI_VERSION, (uint32_t)sizeof(RqPluginTable), "hostile", "0.1.0", RQ_KIND_PUSHER,
    h_create, h_push, h_check, h_destroy, h_free,
};

const RqPluginTable *retryq_plugin_entry_v1(void) { return &TABLE; }
