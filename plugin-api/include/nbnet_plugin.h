/*
 * nbnet_plugin.h -- the C interface of nbnet plugins.
 *
 * nbnet is a pre-forking TCP server. Every message is a 10-digit ASCII length
 * header followed by that many payload bytes; nbnet does the networking and
 * hands each request payload to a plugin, which writes the response payload.
 *
 * A C plugin is a shared library exporting ONE symbol:
 *
 *     const nbnet_plugin *nbnet_plugin_entry(void);
 *
 * returning a pointer to a static, filled-in nbnet_plugin table. Build one with:
 *
 *     cc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden \
 *        -I plugin-api/include -o libmyplugin.so myplugin.c
 *
 * Process model: each worker process loads the library after it is forked,
 * calls init once to create its own instance, then calls process once per
 * request (or, if the plugin has one, process_batch once for all the
 * pipelined requests of one read), never concurrently on one instance (no
 * locking needed). A slow process stalls that worker's other connections:
 * a plugin that waits (on a database, another service, a timer) either
 * defers its answers (nbnet_defer, below: answer later from a thread of its
 * own) or runs on a thread pool ([[plugins]] threads = N: N instances, one
 * per pool thread, still never called concurrently). Start threads in init
 * (which runs in the worker, after fork), never in a constructor that runs
 * at dlopen. destroy frees the instance.
 *
 * Memory: the host owns every buffer it passes; the plugin owns its state.
 * Nothing allocated on one side is freed on the other.
 *
 * Processes: the plugin may fork (the worker's sockets are closed in the
 * child), but whatever it starts is killed when its worker exits. It must not
 * close descriptors it did not open, nor call exit() (that only crashes its
 * worker). init gets [server] init_timeout, each call plugin_timeout.
 *
 * Versioning: NBNET_ABI_MAJOR changes only when meaning or layout changes;
 * the host refuses any other major. A minor bump only appends fields at the
 * end of a struct, so a plugin built for an older minor loads in a newer host.
 * A host refuses a plugin built for a newer minor than its own.
 */
#ifndef NBNET_PLUGIN_H
#define NBNET_PLUGIN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- versions */

#define NBNET_ABI_MAJOR 1
#define NBNET_ABI_MINOR 3 /* 1.1: in-place responses (data/len/cap/grow), process_batch;
                           * 1.2: nbnet_conn.flags (connections handed over);
                           * 1.3: deferred answers (resp->defer, nbnet_deferred),
                           *      nbnet_init_ctx.thread_index / thread_count,
                           *      nbnet_conn TLS facts (NBNET_CONN_TLS, tls_*) */

/* ------------------------------------------------------------ return codes */

#define NBNET_OK 0
#define NBNET_ERR (-1)

/* -------------------------------------------------------------- log levels */

#define NBNET_LOG_ERROR 1
#define NBNET_LOG_WARN 2
#define NBNET_LOG_INFO 3
#define NBNET_LOG_DEBUG 4

/* -------------------------------------------------------------- export tag */

#ifndef NBNET_EXPORT
#define NBNET_EXPORT __attribute__((visibility("default")))
#endif

/* ----------------------------------------------------- connection (host) */

/* A client connection as the host describes it to process (via resp->conn)
 * and to the connection hooks. Valid only during the call that receives it;
 * copy what you keep. */
typedef struct nbnet_conn {
    uint64_t id;          /* unique across this server's workers, never reused */
    const char *peer;     /* client address "IP:PORT" (NUL-terminated) */
    const char *listener; /* listener address "IP:PORT" it arrived on */
    uint32_t flags;       /* ABI 1.2: NBNET_CONN_HANDED_OVER, NBNET_CONN_TLS (1.3) */
    /* ABI 1.3: what a TLS listener learned (0 / NULL without TLS). on_open
     * runs at accept, before the handshake: there only the NBNET_CONN_TLS
     * flag is set; process and on_close see the rest. */
    uint32_t tls_version;         /* 0x0303 TLS 1.2, 0x0304 TLS 1.3, 0 */
    const char *tls_subject;      /* mutual TLS: the client certificate's
                                     subject, RFC 4514 ("CN=c,O=Example"):
                                     a value's , + ; < > " \ and control
                                     characters are escaped with \, so a
                                     name cannot forge another attribute;
                                     NULL without a client certificate */
    const char *tls_sans;         /* its subject alternative names, comma
                                     separated: "DNS:a.example,IP:10.0.0.1,
                                     URI:spiffe://x,email:a@b" ("" if none),
                                     values escaped as in tls_subject;
                                     NULL without a client certificate */
} nbnet_conn;

/* nbnet_conn.flags: the connection moves to another worker without closing
 * (a reload, a worker's replacement). In on_close: handed over, the client
 * stays connected elsewhere. In on_open: accepted earlier by another worker. */
#define NBNET_CONN_HANDED_OVER 1u
/* nbnet_conn.flags (ABI 1.3): the client speaks TLS on this connection. */
#define NBNET_CONN_TLS 2u

/* ------------------------------------------------ deferred answers (1.3) */

/* A completion handle for one request answered later (ABI 1.3). Made by
 * nbnet_defer(resp) inside process (or process_batch); host memory.
 *
 * Ownership and threads: the handle is yours until you complete it, with
 * nbnet_answer (the answer's bytes, copied before it returns: data stays
 * yours) or nbnet_fail (the request fails: the host logs msg with the
 * plugin's name and closes the connection after the answers before it).
 * Complete it exactly once, from any thread, at any time: after the client
 * has gone or after [server] deferred_timeout it does nothing (the host
 * counts it). A second completion returns NBNET_ERR and does nothing; do
 * not use the handle after completing it (the host reuses its memory once
 * many later handles are completed). Never free it. An answer longer than
 * max_frame_bytes fails the request. Answers go to the client in request
 * order: a later request on the same connection, answered first, waits. */
typedef struct nbnet_deferred {
    int (*answer)(struct nbnet_deferred *d, const uint8_t *data, size_t len);
    int (*fail)(struct nbnet_deferred *d, const char *msg, size_t len);
    void *host; /* host-private */
} nbnet_deferred;

/* ------------------------------------------------------- response (host) */

/* Where process writes its answer. Built by the host for one process call and
 * valid only during it. Use the helpers at the end of this file.
 *
 * The answer lives in host memory: data[0..len) is what is written so far,
 * data[len..cap) is room you may write into directly, advancing len (ABI
 * 1.1). That is the fast path: no call into the host per write. For more
 * room call grow(resp, n): afterwards cap - len >= n (data may have moved,
 * the bytes written move with it), or NBNET_ERR past max_frame_bytes, and
 * the request fails. cap never reaches past max_frame_bytes (in a batch:
 * past answer_start + max_frame_bytes). Only len is yours to change: a
 * changed data or cap (or any other field: the host lends them afresh to
 * every call), or len > cap when process returns, fails the request and
 * nothing of it is sent. Every byte counted in len must have
 * been written. The older callbacks (write, reserve/commit) keep data, len
 * and cap up to date, so both styles mix. */
typedef struct nbnet_response {
    void *host; /* host-private: pass the response back untouched */
    /* Append len bytes. NBNET_ERR (and nothing appended) when the response
     * would exceed the host's max_frame_bytes. */
    int (*write)(struct nbnet_response *resp, const uint8_t *data, size_t len);
    /* Say why process returns NBNET_ERR; the host copies and logs it. */
    void (*set_error)(struct nbnet_response *resp, const char *msg, size_t len);
    const nbnet_conn *conn; /* the connection this request came on */
    /* Room for up to len more bytes, written in place (no copy): returns
     * data + len after growing (host memory, uninitialized), or NULL if that
     * would exceed max_frame_bytes. Valid only until the next call on resp:
     * fill it, then commit. */
    uint8_t *(*reserve)(struct nbnet_response *resp, size_t len);
    /* Append the first len (<= reserved) bytes written at the pointer the
     * last reserve returned, with no other call (or change of len) in
     * between; otherwise NBNET_ERR and the request fails. */
    int (*commit)(struct nbnet_response *resp, size_t len);
    /* ABI 1.1: the answer in place (see above). */
    uint8_t *data; /* data[0..len) written, data[len..cap) writable room */
    size_t len;    /* bytes written; advance it after writing in place */
    size_t cap;    /* end of the room (never above max_frame_bytes) */
    /* Make cap - len >= additional (data may move). NBNET_ERR, and nothing
     * changes, if len + additional would exceed max_frame_bytes. */
    int (*grow)(struct nbnet_response *resp, size_t additional);
    /* ABI 1.3: see nbnet_defer below. */
    nbnet_deferred *(*defer)(struct nbnet_response *resp);
} nbnet_response;

/* ------------------------------------------------------ batches (ABI 1.1) */

/* One request of a batch: len > 0 bytes at data, valid during the call. */
typedef struct nbnet_request {
    const uint8_t *data;
    size_t len;
} nbnet_request;

/* What process_batch receives (optional; see nbnet_plugin below): every
 * complete request of one read, to answer in one call -- the cost of
 * crossing into the plugin is then paid once per read, not per request.
 * Answers go back to back into the one response. For request i, in order:
 *   1. *progress += 1            (the host's hang watchdog watches it)
 *   2. answer_start = resp->len + prefix;
 *      make room, fill the prefix bytes with anything (e.g. '0': the host
 *      overwrites them with the frame header), advance resp->len past them
 *   3. write the answer as process would (in place or with the helpers);
 *      max_frame_bytes applies to the bytes written since answer_start
 *   4. lens[i] = resp->len - answer_start
 * Return how many requests were answered, k <= count. k < count after
 * nbnet_error means request k failed: answers 0..k-1 are sent, then the
 * connection is closed. k < count without an error means "stop here": the
 * host passes the rest in a later call. Stop (after at least one answer)
 * once resp->len >= budget: the client has that much to read first (the
 * host does not enforce it). The host checks the account: lens plus the
 * prefixes must add up to exactly what was written (up to answer_start -
 * prefix when a request failed); otherwise nothing of the batch is sent and
 * the connection is closed. So does returning 0 without nbnet_error. */
typedef struct nbnet_batch {
    const nbnet_request *requests; /* count requests, in arrival order */
    size_t count;                  /* at least 1 */
    size_t *lens;                  /* out: lens[i] = length of answer i */
    size_t prefix;                 /* bytes to skip before each answer */
    size_t budget;                 /* stop once resp->len reaches this */
    size_t answer_start;           /* in/out: where the current answer starts */
    uint64_t *progress;            /* add one before starting each request */
} nbnet_batch;

/* ----------------------------------------------------- init context (host) */

/* What init receives. Valid only during init, except log and log_handle,
 * which stay valid until destroy returns. */
typedef struct nbnet_init_ctx {
    uint32_t struct_size;     /* sizeof as the host knows it (grows with minors) */
    uint32_t worker_index;    /* 0 .. worker_count-1 */
    uint32_t worker_count;    /* workers the master runs */
    const char *plugin_name;  /* the plugin's name in the config (NUL-terminated) */
    const char *config_toml;  /* its `config` table as TOML text ("" if none) */
    size_t config_toml_len;   /* strlen(config_toml) */
    void *host;               /* host-private */
    /* Say why init returns NBNET_ERR; the host reports it with the file name. */
    void (*set_error)(const struct nbnet_init_ctx *ctx, const char *msg, size_t len);
    /* Log through the host's logger, tagged with the plugin name. */
    void (*log)(const void *log_handle, int level, const char *msg, size_t len);
    const void *log_handle;   /* first argument of log */
    /* Value of top-level key `key` of the config table as text (strings
     * unquoted, numbers and booleans as TOML writes them), or NULL if absent
     * or not a scalar. Valid until init returns: copy or convert it. */
    const char *(*config_get)(const struct nbnet_init_ctx *ctx, const char *key);
    /* ABI 1.3: with [[plugins]] threads = N > 0 each worker makes N
     * instances, one per pool thread: this one's index 0..N-1 (e.g. to open
     * one database connection each), and N. Both 0 on the reactor thread. */
    uint32_t thread_index;
    uint32_t thread_count;
} nbnet_init_ctx;

/* ------------------------------------------------------- plugin table (you) */

typedef struct nbnet_plugin {
    uint32_t abi_major;   /* NBNET_ABI_MAJOR -- checked first */
    uint32_t abi_minor;   /* NBNET_ABI_MINOR */
    uint32_t struct_size; /* sizeof(nbnet_plugin) */
    const char *name;     /* the plugin's own name, static */
    const char *version;  /* the plugin's own version, static */
    /* Create this worker's instance in *state. NBNET_OK, or NBNET_ERR after
     * ctx->set_error. Required. */
    int (*init)(const nbnet_init_ctx *ctx, void **state);
    /* Answer one request (len > 0 bytes, valid during the call) through resp.
     * NBNET_OK, or NBNET_ERR after set_error: the host logs the message with
     * the plugin name and closes that client's connection. Required. */
    int (*process)(void *state, const uint8_t *req, size_t len, nbnet_response *resp);
    /* Free the instance. May be NULL. */
    void (*destroy)(void *state);
    /* Optional hooks (NULL = not interested). */
    void (*on_open)(void *state, const nbnet_conn *conn);  /* a client connected */
    void (*on_close)(void *state, const nbnet_conn *conn); /* it disconnected */
    void (*on_shutdown)(void *state); /* the worker is stopping; destroy follows */
    /* ABI 1.1, optional (NULL = process per request): answer a batch of
     * requests in one call, following the steps above nbnet_batch. The host
     * usually calls process for a read that holds a single request (not
     * right after pipelined ones): both must give the same answers. */
    size_t (*process_batch)(void *state, nbnet_batch *batch, nbnet_response *resp);
} nbnet_plugin;

/* The one symbol a plugin exports. */
NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void);

/* ---------------------------------------------------------------- helpers */

/* Room for n more bytes at resp->data + resp->len: free when the host already
 * gave enough, one call otherwise. NBNET_OK, or NBNET_ERR past
 * max_frame_bytes (the request then fails: return an error from process).
 * After a call into the host, re-read resp->data: it may have moved. */
static inline int nbnet_ensure(nbnet_response *resp, size_t n) {
    if (resp->len <= resp->cap && n <= resp->cap - resp->len) {
        return NBNET_OK;
    }
    return resp->grow(resp, n);
}

/* Append len bytes (a memcpy into the host's buffer). data may point into
 * the response itself (it is found again if the buffer moves). */
static inline int nbnet_write(nbnet_response *resp, const void *data, size_t len) {
    const uint8_t *src = (const uint8_t *)data;
    int own = resp->len > 0 && src >= resp->data && src < resp->data + resp->len;
    size_t offset = own ? (size_t)(src - resp->data) : 0;
    if (nbnet_ensure(resp, len) != NBNET_OK) {
        return NBNET_ERR;
    }
    if (len > 0) {
        memmove(resp->data + resp->len, own ? resp->data + offset : src, len);
        resp->len += len;
    }
    return NBNET_OK;
}

/* Where to compute up to len bytes in place, or NULL past max_frame_bytes;
 * then nbnet_commit the number written. These two go through the host,
 * which checks that each commit matches its reserve (a mismatch fails the
 * request). For the fastest path write at resp->data + resp->len after
 * nbnet_ensure and advance resp->len yourself. */
static inline uint8_t *nbnet_reserve(nbnet_response *resp, size_t len) {
    return resp->reserve(resp, len);
}

/* Append the first len bytes written at the last nbnet_reserve. */
static inline int nbnet_commit(nbnet_response *resp, size_t len) {
    return resp->commit(resp, len);
}

/* Record why process fails; returns NBNET_ERR for `return nbnet_error(...)`. */
static inline int nbnet_error(nbnet_response *resp, const char *msg, size_t len) {
    resp->set_error(resp, msg, len);
    return NBNET_ERR;
}

/* ABI 1.3: answer this request later. Returns a handle to complete with
 * nbnet_answer or nbnet_fail (from any thread); then return NBNET_OK from
 * process with nothing written. NULL when the host refuses (its
 * max_deferred_per_worker is reached, or this request was deferred
 * already): the request fails, whatever process returns. */
static inline nbnet_deferred *nbnet_defer(nbnet_response *resp) {
    return resp->defer(resp);
}

/* Complete a deferred request with len bytes at data (copied). NBNET_OK, or
 * NBNET_ERR if the handle was completed already. */
static inline int nbnet_answer(nbnet_deferred *d, const uint8_t *data, size_t len) {
    return d->answer(d, data, len);
}

/* Fail a deferred request with a message (copied). NBNET_OK, or NBNET_ERR
 * if the handle was completed already. */
static inline int nbnet_fail(nbnet_deferred *d, const char *msg, size_t len) {
    return d->fail(d, msg, len);
}

#ifdef __cplusplus
}
#endif

#endif /* NBNET_PLUGIN_H */
