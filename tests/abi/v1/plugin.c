/* A plugin built against the frozen 1.0 header (tests/abi/v1/retryq_plugin.h)
 * exactly as a plugin author would have written it then: every host since
 * must load it and pass it through the conformance checks. It delivers
 * every push, refuses settings that are not an object or carry an unknown
 * key (it knows only "greeting"), and logs through the host callback. */
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

/* Accepts "{}" and {"greeting": "..."} only. */
static int settings_ok(const uint8_t *s, size_t len) {
    size_t i = 0;
    while (i < len && (s[i] == ' ' || s[i] == '\n')) i++;
    if (i >= len || s[i] != '{') return 0;
    for (size_t j = i + 1; j < len; j++) {
        if (s[j] == '"') {
            const char *k = "\"greeting\"";
            return len - j >= strlen(k) && memcmp(s + j, k, strlen(k)) == 0;
        }
    }
    return 1;
}

static int32_t v1_create(uint32_t kind, const uint8_t *settings, size_t len,
                         const RqHostCallbacks *host, void **out, RqBuf *err) {
    if (kind != RQ_KIND_PUSHER) { *err = make_buf("v1 provides only a pusher"); return RQ_BAD_CONFIG; }
    if (!settings_ok(settings, len)) { *err = make_buf("v1: settings must be {} or {\"greeting\": ...}"); return RQ_BAD_CONFIG; }
    if (host && host->log) host->log(RQ_LOG_INFO, (const uint8_t *)"v1 created", 10);
    *out = malloc(1);
    return RQ_OK;
}

static int32_t v1_push(void *inst, const uint8_t *meta, size_t meta_len, const uint8_t *payload,
                       size_t payload_len, uint64_t deadline, RqPushResult *out) {
    (void)inst; (void)meta; (void)meta_len; (void)payload; (void)payload_len; (void)deadline;
    out->status = RQ_OK;
    out->retry_after_ms = -1;
    out->message = make_buf("");
    return RQ_OK;
}

static int32_t v1_check(void *inst, const uint8_t *fps, size_t len, uint64_t deadline, RqBuf *out) {
    (void)inst; (void)fps; (void)len; (void)deadline;
    *out = make_buf("no checker");
    return RQ_RETRYABLE;
}

static void v1_destroy(void *inst) { free(inst); }
static void v1_free(RqBuf b) { free(b.ptr); }

static const RqPluginTable TABLE = {
    RQ_ABI_VERSION, (uint32_t)sizeof(RqPluginTable), "abi-v1", "1.0.0", RQ_KIND_PUSHER,
    v1_create, v1_push, v1_check, v1_destroy, v1_free,
};

const RqPluginTable *retryq_plugin_entry_v1(void) { return &TABLE; }
