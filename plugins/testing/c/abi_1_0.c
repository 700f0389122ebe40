/*
 * abi_1_0.c -- test-only plugin written the way a plugin built against ABI
 * 1.0 works: it declares abi_minor 0, and reaches the response only through
 * the 1.0 callbacks (write, reserve/commit, set_error) -- never the 1.1
 * in-place fields, which a 1.0 header does not have. It checks that a newer
 * host still serves such a plugin. The request decides:
 *
 *   "fail"       -> NBNET_ERR with "abi_1_0 refuses"
 *   anything else -> "v1.0:" then the request reversed, computed in place
 *                    (reserve/commit), then "!" (write)
 */
#include "nbnet_plugin.h"

/* The 1.0 response: the callbacks only (the fields 1.1 appends come after). */
typedef struct {
    void *host;
    int (*write)(void *resp, const uint8_t *data, size_t len);
    void (*set_error)(void *resp, const char *msg, size_t len);
    const nbnet_conn *conn;
    uint8_t *(*reserve)(void *resp, size_t len);
    int (*commit)(void *resp, size_t len);
} response_1_0;

static int old_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

static int old_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    response_1_0 *r = (response_1_0 *)(void *)resp;
    if (len == 4 && req[0] == 'f' && req[1] == 'a' && req[2] == 'i' && req[3] == 'l') {
        static const char msg[] = "abi_1_0 refuses";
        r->set_error(r, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    if (r->write(r, (const uint8_t *)"v1.0:", 5) != NBNET_OK) {
        return NBNET_ERR;
    }
    uint8_t *out = r->reserve(r, len);
    if (out == NULL) {
        return NBNET_ERR;
    }
    for (size_t i = 0; i < len; i++) {
        out[i] = req[len - 1 - i];
    }
    if (r->commit(r, len) != NBNET_OK) {
        return NBNET_ERR;
    }
    return r->write(r, (const uint8_t *)"!", 1);
}

/* The 1.0 table ended at on_shutdown: its size says so (the host must not
 * read process_batch, which 1.1 appended). */
static const nbnet_plugin old_plugin = {
    .abi_major = 1,
    .abi_minor = 0,
    .struct_size = offsetof(nbnet_plugin, process_batch),
    .name = "abi_1_0",
    .version = "0.1.0",
    .init = old_init,
    .process = old_process,
    .destroy = NULL,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &old_plugin; }
