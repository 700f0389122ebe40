/*
 * batcher.c -- test-only C plugin with both process and process_batch (ABI
 * 1.1), so the tests can see which one the host used and that a C batch
 * follows the protocol in nbnet_plugin.h. Answers are the request upper-cased
 * behind a tag: "P:" when answered by process, "B<i>/<n>:" when answered as
 * request i (from 0) of a batch of n. In a batch:
 *
 *   "fail"  -> fails that request (set_error "batcher refuses"): the host
 *              delivers the answers before it and closes the connection
 *   "stop"  -> answered, then the call returns early without an error: the
 *              host must answer the requests after it in a later call
 *   "zero"  -> (first in a batch) returns 0 without an error: a broken
 *              batch the host must close, not retry forever
 *   "lie"   -> answered, but its length is reported with the prefix
 *              counted in (an off-by-prefix bug): nothing may be sent
 *
 * Everything is written in place (nbnet_ensure, resp->data/len).
 */
#include <stdio.h>
#include <string.h>

#include "nbnet_plugin.h"

static int batcher_init(const nbnet_init_ctx *ctx, void **state) {
    (void)ctx;
    *state = NULL;
    return NBNET_OK;
}

/* Appends tag then req upper-cased at resp->len. */
static int answer(nbnet_response *resp, const char *tag, size_t tag_len, const uint8_t *req,
                  size_t len) {
    if (nbnet_ensure(resp, tag_len + len) != NBNET_OK) {
        return NBNET_ERR;
    }
    uint8_t *out = resp->data + resp->len;
    memcpy(out, tag, tag_len);
    for (size_t i = 0; i < len; i++) {
        uint8_t c = req[i];
        out[tag_len + i] = (c >= 'a' && c <= 'z') ? (uint8_t)(c - 'a' + 'A') : c;
    }
    resp->len += tag_len + len;
    return NBNET_OK;
}

static int is(const uint8_t *req, size_t len, const char *word) {
    size_t n = strlen(word);
    return len == n && memcmp(req, word, n) == 0;
}

static int batcher_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    return answer(resp, "P:", 2, req, len);
}

static size_t batcher_process_batch(void *state, nbnet_batch *batch, nbnet_response *resp) {
    (void)state;
    size_t i;
    if (is(batch->requests[0].data, batch->requests[0].len, "zero")) {
        return 0;
    }
    for (i = 0; i < batch->count; i++) {
        const nbnet_request *req = &batch->requests[i];
        *batch->progress += 1;
        batch->answer_start = resp->len + batch->prefix;
        if (nbnet_ensure(resp, batch->prefix) != NBNET_OK) {
            return i;
        }
        memset(resp->data + resp->len, '0', batch->prefix); /* the host's header goes here */
        resp->len += batch->prefix;
        if (is(req->data, req->len, "fail")) {
            static const char msg[] = "batcher refuses";
            nbnet_error(resp, msg, sizeof msg - 1);
            return i;
        }
        char tag[48];
        int n = snprintf(tag, sizeof tag, "B%zu/%zu:", i, batch->count);
        if (answer(resp, tag, (size_t)n, req->data, req->len) != NBNET_OK) {
            static const char msg[] = "batcher: answer too big";
            nbnet_error(resp, msg, sizeof msg - 1);
            return i;
        }
        batch->lens[i] = resp->len - batch->answer_start;
        if (is(req->data, req->len, "lie")) {
            batch->lens[i] += batch->prefix;
        }
        if (is(req->data, req->len, "stop") || resp->len >= batch->budget) {
            return i + 1;
        }
    }
    return i;
}

static const nbnet_plugin batcher_plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "batcher",
    .version = "0.1.0",
    .init = batcher_init,
    .process = batcher_process,
    .destroy = NULL,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = batcher_process_batch,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) { return &batcher_plugin; }
