/* A small C plugin for the loader tests. Its behaviour is chosen at
 * compile time so one source yields the good plugin and the broken ones:
 *   (default)        a pusher: delivers, unless the payload contains
 *                    "fail" (retryable, Retry-After 1500 ms) or "reject"
 *                    (permanent); settings {"refuse": true} are refused.
 *   -DBAD_ABI        reports ABI version 99.
 *   -DSHORT_TABLE    reports a struct_size smaller than version 1's.
 *   -DNO_ENTRY       exports no entry symbol. */
#include <stdlib.h>
#include <string.h>
#include "retryq_plugin.h"

static RqBuf make_buf(const char *text) {
    RqBuf b;
    b.len = strlen(text);
    b.cap = b.len;
    b.ptr = (uint8_t *)malloc(b.len ? b.len : 1);
    memcpy(b.ptr, text, b.len);
    return b;
}

static int contains(const uint8_t *hay, size_t len, const char *needle) {
    size_t n = strlen(needle);
    for (size_t i = 0; i + n <= len; i++)
        if (memcmp(hay + i, needle, n) == 0) return 1;
    return 0;
}

static int32_t echo_create(uint32_t kind, const uint8_t *settings, size_t len,
                           const RqHostCallbacks *host, void **out, RqBuf *err) {
    if (kind != RQ_KIND_PUSHER) { *err = make_buf("echo provides only a pusher"); return RQ_BAD_CONFIG; }
    if (contains(settings, len, "\"refuse\":true")) { *err = make_buf("echo: refused as asked"); return RQ_BAD_CONFIG; }
    if (host && host->log) host->log(RQ_LOG_INFO, (const uint8_t *)"echo created", 12);
    *out = malloc(1);
    return RQ_OK;
}

static int32_t echo_push(void *inst, const uint8_t *meta, size_t meta_len, const uint8_t *payload,
                         size_t payload_len, uint64_t deadline, RqPushResult *out) {
    (void)inst; (void)meta; (void)meta_len; (void)deadline;
    out->retry_after_ms = -1;
    if (contains(payload, payload_len, "fail")) {
        out->status = RQ_RETRYABLE; out->retry_after_ms = 1500; out->message = make_buf("echo: fail");
    } else if (contains(payload, payload_len, "reject")) {
        out->status = RQ_PERMANENT; out->message = make_buf("echo: rejected");
    } else {
        out->status = RQ_OK; out->message = make_buf("");
    }
    return out->status;
}

static int32_t echo_check(void *inst, const uint8_t *fps, size_t len, uint64_t deadline, RqBuf *out) {
    (void)inst; (void)fps; (void)len; (void)deadline;
    *out = make_buf("echo provides no checker");
    return RQ_PERMANENT;
}

static void echo_destroy(void *inst) { free(inst); }
static void echo_free(RqBuf b) { free(b.ptr); }

static const RqPluginTable TABLE = {
#ifdef BAD_ABI
    99u,
#else
    RQ_ABI_VERSION,
#endif
#ifdef SHORT_TABLE
    8u,
#else
    (uint32_t)sizeof(RqPluginTable),
#endif
    "echo", "0.1.0", RQ_KIND_PUSHER,
    echo_create, echo_push, echo_check, echo_destroy, echo_free,
};

#ifndef NO_ENTRY
const RqPluginTable *retryq_plugin_entry_v1(void) { return &TABLE; }
#else
const RqPluginTable *some_other_symbol(void) { return &TABLE; }
#endif
