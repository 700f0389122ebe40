/*
 * hello.c -- the C walk-through plugin of docs/plugins.md: answers NAME with
 * "hello, NAME!"; the greeting comes from its config (greeting = "hi").
 * Build (from the repository root):
 *
 *   cc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden \
 *      -I plugin-api/include -o target/libhello_c.so docs/examples/hello.c
 */
#include <stdlib.h>
#include <string.h>

#include "nbnet_plugin.h"

/* One instance per worker process. */
typedef struct {
    char *greeting; /* our own copy: config_get's text dies when init returns */
    size_t greeting_len;
} hello_state;

static int hello_init(const nbnet_init_ctx *ctx, void **state) {
    const char *greeting = ctx->config_get(ctx, "greeting"); /* NULL if absent */
    if (greeting == NULL) {
        greeting = "hello";
    }
    if (greeting[0] == '\0') {
        static const char msg[] = "greeting must not be empty";
        ctx->set_error(ctx, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    size_t len = strlen(greeting);
    hello_state *s = (hello_state *)malloc(sizeof *s);
    char *copy = (char *)malloc(len + 1);
    if (s == NULL || copy == NULL) {
        free(s);
        free(copy);
        static const char msg[] = "out of memory";
        ctx->set_error(ctx, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    memcpy(copy, greeting, len + 1);
    s->greeting = copy;
    s->greeting_len = len;

    static const char ready[] = "ready";
    ctx->log(ctx->log_handle, NBNET_LOG_INFO, ready, sizeof ready - 1);
    *state = s;
    return NBNET_OK;
}

static int hello_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    hello_state *s = (hello_state *)state;
    if (nbnet_write(resp, s->greeting, s->greeting_len) != NBNET_OK ||
        nbnet_write(resp, ", ", 2) != NBNET_OK || nbnet_write(resp, req, len) != NBNET_OK ||
        nbnet_write(resp, "!", 1) != NBNET_OK) {
        static const char msg[] = "response larger than max_frame_bytes";
        return nbnet_error(resp, msg, sizeof msg - 1);
    }
    return NBNET_OK;
}

static void hello_destroy(void *state) {
    hello_state *s = (hello_state *)state;
    free(s->greeting);
    free(s);
}

/* Every field, in declaration order (so the file also compiles as C++20). */
static const nbnet_plugin hello_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "hello-c",
    .version = "0.1.0",
    .init = hello_init,
    .process = hello_process,
    .destroy = hello_destroy,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = NULL, /* ABI 1.1: optional, see nbnet_plugin.h */
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &hello_plugin; }
