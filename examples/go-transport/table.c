// The plugin table and the C-side helpers of the Go transport. cgo does not
// let a Go file's preamble define C symbols that Go code also exports, so
// the static table lives here and points at the functions main.go exports.
#include <stdlib.h>
#include "retryq_plugin.h"
#include "_cgo_export.h"

// Calls the host's log callback, if the host's struct reaches it (the
// evolution rule for RqHostCallbacks).
void rq_go_log(const RqHostCallbacks *host, int32_t level, const uint8_t *msg, size_t len) {
    size_t need = offsetof(RqHostCallbacks, log) + sizeof(host->log);
    if (host && host->struct_size >= need && host->log) host->log(level, msg, len);
}

static void rq_go_free(RqBuf b) { free(b.ptr); }

static const RqPluginTable TABLE = {
    RQ_ABI_VERSION,
    (uint32_t)sizeof(RqPluginTable),
    "go-transport",
    "0.1.0",
    RQ_KIND_PUSHER,
    (int32_t (*)(uint32_t, const uint8_t *, size_t, const RqHostCallbacks *, void **, RqBuf *))goCreate,
    (int32_t (*)(void *, const uint8_t *, size_t, const uint8_t *, size_t, uint64_t, RqPushResult *))goPush,
    (int32_t (*)(void *, const uint8_t *, size_t, uint64_t, RqBuf *))goCheck,
    (void (*)(void *))goDestroy,
    rq_go_free,
    "an HTTP transport written in Go (cgo, -buildmode=c-shared)",
};

const RqPluginTable *retryq_plugin_entry_v1(void) { return &TABLE; }
