// Package main is a retryq transport plugin written in Go: built with
// `go build -buildmode=c-shared`, it exports the C ABI of
// plugins/sdk/include/retryq_plugin.h (the table is in table.c) and POSTs
// each report to an HTTP upstream.
//
// Settings (JSON, unknown keys refused):
//
//	{"url": "http://host/v1/reports", "headers": {"Authorization": "Bearer ..."}}
//
// Outcomes: 2xx delivered; 408, 425, 429, 5xx and network errors retryable
// (with Retry-After); 401 and 403 unauthorized; any other 4xx permanent.
package main

/*
#cgo CFLAGS: -I${SRCDIR}/../../plugins/sdk/include
#include <stdlib.h>
#include "retryq_plugin.h"

void rq_go_log(const RqHostCallbacks *host, int32_t level, const uint8_t *msg, size_t len);
*/
import "C"

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"
	"unsafe"
)

type settings struct {
	URL     string            `json:"url"`
	Headers map[string]string `json:"headers"`
}

type itemMeta struct {
	ID   string `json:"id"`
	Type string `json:"type"`
}

type instance struct {
	settings settings
	client   *http.Client
}

// Instances by the C handle given to the host: Go memory must not be held
// by C, so the host gets a malloc'd token and Go keeps the instance.
var (
	mu        sync.Mutex
	instances = map[uintptr]*instance{}
	host      *C.RqHostCallbacks
)

func logLine(level int32, msg string) {
	if host == nil || len(msg) == 0 {
		return
	}
	b := []byte(msg)
	C.rq_go_log(host, C.int32_t(level), (*C.uint8_t)(unsafe.Pointer(&b[0])), C.size_t(len(b)))
}

// cBuf copies s into a malloc'd RqBuf the host frees with free_buffer.
func cBuf(s string) C.RqBuf {
	var b C.RqBuf
	if len(s) == 0 {
		return b
	}
	b.ptr = (*C.uint8_t)(C.CBytes([]byte(s)))
	b.len = C.size_t(len(s))
	b.cap = b.len
	return b
}

func goBytes(p *C.uint8_t, n C.size_t) []byte {
	if p == nil || n == 0 {
		return nil
	}
	return C.GoBytes(unsafe.Pointer(p), C.int(n))
}

//export goCreate
func goCreate(kind C.uint32_t, raw *C.uint8_t, rawLen C.size_t, h *C.RqHostCallbacks, out *unsafe.Pointer, outErr *C.RqBuf) C.int32_t {
	if kind != C.RQ_KIND_PUSHER {
		*outErr = cBuf("go-transport provides only a pusher")
		return C.RQ_BAD_CONFIG
	}
	var s settings
	dec := json.NewDecoder(bytes.NewReader(goBytes(raw, rawLen)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		*outErr = cBuf("go-transport settings: " + err.Error())
		return C.RQ_BAD_CONFIG
	}
	if s.URL == "" {
		*outErr = cBuf("go-transport settings: url is required")
		return C.RQ_BAD_CONFIG
	}
	token := C.malloc(1)
	mu.Lock()
	host = h
	instances[uintptr(token)] = &instance{settings: s, client: &http.Client{}}
	mu.Unlock()
	*out = token
	logLine(C.RQ_LOG_INFO, "go-transport created for "+s.URL)
	return C.RQ_OK
}

func lookup(token unsafe.Pointer) *instance {
	mu.Lock()
	defer mu.Unlock()
	return instances[uintptr(token)]
}

//export goPush
func goPush(token unsafe.Pointer, meta *C.uint8_t, metaLen C.size_t, payload *C.uint8_t, payloadLen C.size_t, deadlineMs C.uint64_t, out *C.RqPushResult) C.int32_t {
	out.retry_after_ms = -1
	set := func(status C.int32_t, msg string) C.int32_t {
		out.status = status
		out.message = cBuf(msg)
		return status
	}
	inst := lookup(token)
	if inst == nil {
		return set(C.RQ_PANICKED, "go-transport: unknown instance")
	}
	var m itemMeta
	if err := json.Unmarshal(goBytes(meta, metaLen), &m); err != nil {
		return set(C.RQ_PERMANENT, "go-transport: bad item metadata: "+err.Error())
	}
	ctx, cancel := context.WithDeadline(context.Background(), time.UnixMilli(int64(deadlineMs)))
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, inst.settings.URL, bytes.NewReader(goBytes(payload, payloadLen)))
	if err != nil {
		return set(C.RQ_PERMANENT, "go-transport: "+err.Error())
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", m.ID)
	req.Header.Set("X-Report-Type", m.Type)
	for k, v := range inst.settings.Headers {
		req.Header.Set(k, v)
	}
	resp, err := inst.client.Do(req)
	if err != nil {
		return set(C.RQ_RETRYABLE, "go-transport: "+err.Error())
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	code := resp.StatusCode
	msg := fmt.Sprintf("upstream answered %d", code)
	switch {
	case code >= 200 && code < 300:
		return set(C.RQ_OK, "")
	case code == 401 || code == 403:
		return set(C.RQ_UNAUTHORIZED, msg)
	case code == 408 || code == 425 || code == 429 || code >= 500:
		if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && secs >= 0 {
			out.retry_after_ms = C.int64_t(secs) * 1000
		}
		logLine(C.RQ_LOG_WARN, "go-transport: "+msg+" for "+m.ID)
		return set(C.RQ_RETRYABLE, msg)
	default:
		return set(C.RQ_PERMANENT, msg)
	}
}

//export goCheck
func goCheck(token unsafe.Pointer, fps *C.uint8_t, n C.size_t, deadlineMs C.uint64_t, out *C.RqBuf) C.int32_t {
	*out = cBuf("go-transport provides no fingerprint checker")
	return C.RQ_RETRYABLE
}

//export goDestroy
func goDestroy(token unsafe.Pointer) {
	mu.Lock()
	delete(instances, uintptr(token))
	mu.Unlock()
	C.free(token)
}

func main() {}
