/*
 * misbehave.c -- test-only plugin that misbehaves on request, so the tests can
 * check how the host copes with a plugin error, an oversized response and a
 * crashing worker. The request decides:
 *
 *   "fail..."   -> returns NBNET_ERR with "misbehave refuses: <request>"
 *   "big:N"     -> writes N bytes of 'x' (in 100-byte chunks); if the host
 *                  refuses a write (over max_frame_bytes) it returns NBNET_ERR
 *                  with "misbehave: response too big"
 *   "crash"     -> abort(): the worker dies from SIGABRT
 *   "whoami"    -> answers "worker I/N" (its init context's index and count)
 *   "thread"    -> answers "thread T/N": its pool thread and the pool's size
 *                  (ABI 1.3 init context; "thread 0/0" on the reactor thread)
 *   "config"    -> answers its config table as the TOML text it received
 *   "ok"        -> answers "ok <pid> <calls>": the worker's pid and how many
 *                  requests this instance has seen (this one included)
 *   "pid"       -> answers the worker's pid
 *   "segfault"  -> writes through a null pointer: the worker dies from SIGSEGV
 *   "abort"     -> abort(): the worker dies from SIGABRT
 *   "hang"      -> spins forever (the host's watchdog must kill the worker)
 *   "sleep:MS"  -> sleeps MS milliseconds, then answers "slept MS"
 *   "error"     -> returns NBNET_ERR with "misbehave refuses on purpose"
 *   "huge"      -> writes 1 MiB chunks until the host refuses one, then
 *                  returns NBNET_ERR with "misbehave: response too big"
 *   "overrun"   -> writes "secret" in place, then sets resp->len past
 *                  resp->cap (a buffer-protocol bug) and returns NBNET_OK
 *   anything else -> echoed back
 *
 * (The same requests, plus "panic", drive the Rust test plugin in
 * plugins/testing/misbehave-rs.)
 *
 * init logs "misbehave init worker I/N" through the host's logger. With
 * `fail_init_worker = I` in its config table, init fails in worker I only
 * ("misbehave refuses to init worker I"), as a plugin that cannot start in
 * one worker (a port or file it cannot get, say) would.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nbnet_plugin.h"

typedef struct {
    uint32_t worker_index;
    uint32_t worker_count;
    uint32_t thread_index;
    uint32_t thread_count;
    char *config;
    size_t config_len;
    unsigned long long calls;
} misbehave_state;

/* Volatile, so that the compiler cannot see that "segfault" writes through NULL. */
static unsigned char *volatile null_target = NULL;

static int is(const uint8_t *req, size_t len, const char *word) {
    size_t n = strlen(word);
    return len == n && memcmp(req, word, n) == 0;
}

static int write_text(nbnet_response *resp, const char *fmt, unsigned long long value) {
    char out[64];
    int n = snprintf(out, sizeof out, fmt, value);
    return nbnet_write(resp, out, n > 0 ? (size_t)n : 0);
}

static int starts_with(const uint8_t *req, size_t len, const char *prefix) {
    size_t n = strlen(prefix);
    return len >= n && memcmp(req, prefix, n) == 0;
}

static int misbehave_init(const nbnet_init_ctx *ctx, void **state) {
    misbehave_state *s = calloc(1, sizeof *s);
    if (s == NULL) {
        static const char msg[] = "out of memory";
        ctx->set_error(ctx, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    s->worker_index = ctx->worker_index;
    if (ctx->struct_size >= offsetof(nbnet_init_ctx, thread_count) + sizeof(uint32_t)) {
        s->thread_index = ctx->thread_index;
        s->thread_count = ctx->thread_count;
    }
    s->worker_count = ctx->worker_count;
    s->config_len = ctx->config_toml_len;
    s->config = malloc(s->config_len + 1);
    if (s->config == NULL) {
        free(s);
        static const char msg[] = "out of memory";
        ctx->set_error(ctx, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    memcpy(s->config, ctx->config_toml, s->config_len);
    s->config[s->config_len] = '\0';

    const char *fail = strstr(s->config, "fail_init_worker");
    if (fail != NULL) {
        fail = strchr(fail, '=');
        if (fail != NULL && strtoul(fail + 1, NULL, 10) == s->worker_index) {
            char msg[128];
            int n = snprintf(msg, sizeof msg, "misbehave refuses to init worker %u",
                             (unsigned)s->worker_index);
            ctx->set_error(ctx, msg, n > 0 ? (size_t)n : 0);
            free(s->config);
            free(s);
            return NBNET_ERR;
        }
    }

    char line[128];
    int n = snprintf(line, sizeof line, "misbehave init worker %u/%u", (unsigned)s->worker_index,
                     (unsigned)s->worker_count);
    if (n > 0 && ctx->log != NULL) {
        ctx->log(ctx->log_handle, NBNET_LOG_INFO, line, (size_t)n);
    }
    *state = s;
    return NBNET_OK;
}

static int misbehave_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    misbehave_state *s = state;
    s->calls++;
    if (is(req, len, "ok")) {
        char out[64];
        int n = snprintf(out, sizeof out, "ok %ld %llu", (long)getpid(), s->calls);
        return nbnet_write(resp, out, n > 0 ? (size_t)n : 0);
    }
    if (is(req, len, "pid")) {
        return write_text(resp, "%llu", (unsigned long long)getpid());
    }
    if (is(req, len, "segfault")) {
        *null_target = 1;
        static const char msg[] = "misbehave: the null write did not crash";
        return nbnet_error(resp, msg, sizeof msg - 1);
    }
    if (is(req, len, "abort")) {
        abort();
    }
    if (is(req, len, "hang")) {
        for (;;) {
            __asm__ __volatile__("" ::: "memory");
        }
    }
    if (is(req, len, "error")) {
        static const char msg[] = "misbehave refuses on purpose";
        return nbnet_error(resp, msg, sizeof msg - 1);
    }
    if (is(req, len, "overrun")) {
        nbnet_write(resp, "secret", 6);
        resp->len = resp->cap + 4096;
        return NBNET_OK;
    }
    if (is(req, len, "huge")) {
        static uint8_t chunk[1 << 20];
        memset(chunk, 'h', sizeof chunk);
        for (;;) {
            if (nbnet_write(resp, chunk, sizeof chunk) != NBNET_OK) {
                static const char msg[] = "misbehave: response too big";
                return nbnet_error(resp, msg, sizeof msg - 1);
            }
        }
    }
    if (starts_with(req, len, "sleep:")) {
        char digits[32];
        size_t dlen = len - 6 < sizeof digits - 1 ? len - 6 : sizeof digits - 1;
        memcpy(digits, req + 6, dlen);
        digits[dlen] = '\0';
        unsigned long long ms = strtoull(digits, NULL, 10);
        struct timespec left = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
        while (nanosleep(&left, &left) != 0 && errno == EINTR) {
        }
        return write_text(resp, "slept %llu", ms);
    }
    if (starts_with(req, len, "fail")) {
        char msg[256];
        size_t shown = len > 100 ? 100 : len;
        int n = snprintf(msg, sizeof msg, "misbehave refuses: %.*s", (int)shown, (const char *)req);
        return nbnet_error(resp, msg, n > 0 ? (size_t)n : 0);
    }
    if (starts_with(req, len, "big:")) {
        char digits[32];
        size_t dlen = len - 4 < sizeof digits - 1 ? len - 4 : sizeof digits - 1;
        memcpy(digits, req + 4, dlen);
        digits[dlen] = '\0';
        size_t total = (size_t)strtoull(digits, NULL, 10);
        uint8_t chunk[100];
        memset(chunk, 'x', sizeof chunk);
        while (total > 0) {
            size_t step = total < sizeof chunk ? total : sizeof chunk;
            if (nbnet_write(resp, chunk, step) != NBNET_OK) {
                static const char msg[] = "misbehave: response too big";
                return nbnet_error(resp, msg, sizeof msg - 1);
            }
            total -= step;
        }
        return NBNET_OK;
    }
    if (len == 5 && memcmp(req, "crash", 5) == 0) {
        abort();
    }
    if (len == 6 && memcmp(req, "whoami", 6) == 0) {
        char out[64];
        int n = snprintf(out, sizeof out, "worker %u/%u", (unsigned)s->worker_index,
                         (unsigned)s->worker_count);
        return nbnet_write(resp, out, n > 0 ? (size_t)n : 0);
    }
    if (len == 6 && memcmp(req, "thread", 6) == 0) {
        char out[64];
        int n = snprintf(out, sizeof out, "thread %u/%u", (unsigned)s->thread_index,
                         (unsigned)s->thread_count);
        return nbnet_write(resp, out, n > 0 ? (size_t)n : 0);
    }
    if (len == 6 && memcmp(req, "config", 6) == 0) {
        if (s->config_len == 0) {
            return nbnet_write(resp, "(none)", 6);
        }
        return nbnet_write(resp, s->config, s->config_len);
    }
    return nbnet_write(resp, req, len);
}

static void misbehave_destroy(void *state) {
    misbehave_state *s = state;
    free(s->config);
    free(s);
}

static const nbnet_plugin misbehave_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "misbehave",
    .version = "0.1.0",
    .init = misbehave_init,
    .process = misbehave_process,
    .destroy = misbehave_destroy,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &misbehave_plugin; }
