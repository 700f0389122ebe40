/*
 * upper.c -- the `upper` plugin in C: answers with the request in ASCII upper
 * case ("hi" -> "HI"). Build (from the repository root):
 *
 *   cc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden \
 *      -I plugin-api/include -o target/libupper_c.so plugins/upper-c/upper.c
 *
 * Each worker gets its own instance holding a scratch buffer that grows to the
 * largest request seen, so a request costs no allocation after warm-up.
 */
#include <stdlib.h>
#include <string.h>

#include "nbnet_plugin.h"

typedef struct {
    uint8_t *buf;
    size_t cap;
} upper_state;

static int upper_init(const nbnet_init_ctx *ctx, void **state) {
    upper_state *s = (upper_state *)calloc(1, sizeof *s);
    if (s == NULL) {
        static const char msg[] = "out of memory";
        ctx->set_error(ctx, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    *state = s;
    return NBNET_OK;
}

static int upper_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    upper_state *s = (upper_state *)state;
    if (len > s->cap) {
        uint8_t *grown = (uint8_t *)realloc(s->buf, len);
        if (grown == NULL) {
            static const char msg[] = "out of memory";
            return nbnet_error(resp, msg, sizeof msg - 1);
        }
        s->buf = grown;
        s->cap = len;
    }
    for (size_t i = 0; i < len; i++) {
        uint8_t c = req[i];
        s->buf[i] = (c >= 'a' && c <= 'z') ? (uint8_t)(c - 'a' + 'A') : c;
    }
    return nbnet_write(resp, s->buf, len);
}

static void upper_destroy(void *state) {
    upper_state *s = (upper_state *)state;
    free(s->buf);
    free(s);
}

static const nbnet_plugin upper_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "upper-c",
    .version = "0.1.0",
    .init = upper_init,
    .process = upper_process,
    .destroy = upper_destroy,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &upper_plugin; }
