/*
 * counter.c -- a C plugin with per-worker state, config and hooks: it answers
 * each request with a number, the first one being its config's `start` (0 by
 * default), then start+1, start+2, ... Build (from the repository root):
 *
 *   cc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden \
 *      -I plugin-api/include -o target/release/libcounter_c.so plugins/counter-c/counter.c
 *
 * Config:
 *
 *   [[plugins]]
 *   name = "counter"
 *   path = "../target/release/libcounter_c.so"
 *   config = { start = 10 }
 *
 * The counter is per worker: every worker process has its own instance and so
 * its own sequence, and two connections served by different workers both see
 * 10, 11, ... Within a connection the numbers always increase by one.
 *
 * It also counts open connections with the on_open / on_close hooks, and logs
 * through the host at init (info), per connection (debug) and at shutdown.
 * The same file also builds as C++ (add `-x c++ -std=c++20` and use c++).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "nbnet_plugin.h"

typedef struct {
    int64_t next;          /* the value the next request gets */
    uint64_t open;         /* connections open now */
    uint64_t requests;     /* requests answered */
    uint32_t worker_index; /* for log messages */
    /* The host's logger: unlike the rest of the init context, log and
     * log_handle stay valid until destroy returns, so they may be kept. */
    void (*log)(const void *log_handle, int level, const char *msg, size_t len);
    const void *log_handle;
} counter_state;

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static void counter_log(const counter_state *s, int level, const char *fmt, ...) {
    char msg[256];
    va_list args;
    va_start(args, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, args);
    va_end(args);
    if (n < 0) {
        return;
    }
    size_t len = (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1; /* truncated */
    s->log(s->log_handle, level, msg, len);
}

/* Reports why init fails (the host prints it with the plugin's name and file). */
static int init_error(const nbnet_init_ctx *ctx, const char *what, const char *value) {
    char msg[256];
    int n = snprintf(msg, sizeof msg, "invalid config: %s = \"%s\": expected an integer", what, value);
    size_t len = n < 0 ? 0 : (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1;
    ctx->set_error(ctx, msg, len);
    return NBNET_ERR;
}

/* Parses a whole decimal integer, optionally signed. 0 on success. */
static int parse_int64(const char *text, int64_t *out) {
    if (!((text[0] >= '0' && text[0] <= '9') || text[0] == '-' || text[0] == '+')) {
        return -1; /* strtoll would skip leading spaces; refuse them */
    }
    char *end = NULL;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0') {
        return -1;
    }
    *out = (int64_t)value;
    return 0;
}

static int counter_init(const nbnet_init_ctx *ctx, void **state) {
    /* config_get gives TOML scalars as text: `start = 10` -> "10". NULL when
     * the key is absent. The text is valid only until init returns. */
    int64_t start = 0;
    const char *text = ctx->config_get(ctx, "start");
    if (text != NULL && parse_int64(text, &start) != 0) {
        return init_error(ctx, "start", text);
    }
    counter_state *s = (counter_state *)calloc(1, sizeof *s);
    if (s == NULL) {
        static const char msg[] = "out of memory";
        ctx->set_error(ctx, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    s->next = start;
    s->worker_index = ctx->worker_index;
    s->log = ctx->log;
    s->log_handle = ctx->log_handle;
    counter_log(s, NBNET_LOG_INFO, "worker %" PRIu32 " of %" PRIu32 ": counting from %" PRId64,
                ctx->worker_index, ctx->worker_count, start);
    *state = s;
    return NBNET_OK;
}

static int counter_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)req;
    (void)len;
    counter_state *s = (counter_state *)state;
    char text[24]; /* "-9223372036854775808" is 20 characters */
    int n = snprintf(text, sizeof text, "%" PRId64, s->next);
    if (nbnet_write(resp, text, (size_t)n) != NBNET_OK) {
        static const char msg[] = "response too large";
        return nbnet_error(resp, msg, sizeof msg - 1);
    }
    /* Increment through uint64_t: signed overflow is undefined behaviour, and
     * this wraps from INT64_MAX to INT64_MIN instead. */
    s->next = (int64_t)((uint64_t)s->next + 1u);
    s->requests++;
    return NBNET_OK;
}

static void counter_open(void *state, const nbnet_conn *conn) {
    counter_state *s = (counter_state *)state;
    s->open++;
    counter_log(s, NBNET_LOG_DEBUG, "connection %" PRIu64 " from %s opened (%" PRIu64 " open)",
                conn->id, conn->peer, s->open);
}

static void counter_close(void *state, const nbnet_conn *conn) {
    counter_state *s = (counter_state *)state;
    s->open--;
    counter_log(s, NBNET_LOG_DEBUG, "connection %" PRIu64 " closed (%" PRIu64 " open)", conn->id,
                s->open);
}

static void counter_shutdown(void *state) {
    const counter_state *s = (const counter_state *)state;
    counter_log(s, NBNET_LOG_INFO,
                "worker %" PRIu32 " stopping: %" PRIu64 " requests answered, next value %" PRId64
                ", %" PRIu64 " connections open",
                s->worker_index, s->requests, s->next, s->open);
}

static void counter_destroy(void *state) { free(state); }

/* Fields in declaration order, as C++20 designated initializers require. */
static const nbnet_plugin counter_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "counter-c",
    .version = "0.1.0",
    .init = counter_init,
    .process = counter_process,
    .destroy = counter_destroy,
    .on_open = counter_open,
    .on_close = counter_close,
    .on_shutdown = counter_shutdown,
    .process_batch = NULL, /* ABI 1.1: optional, see nbnet_plugin.h */
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &counter_plugin; }
