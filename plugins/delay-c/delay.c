/*
 * delay-c -- an nbnet C plugin that waits without stalling its worker: it
 * answers every request (echoed back) after `ms` milliseconds (config key
 * `ms`, default 10), from a timer thread of its own, through deferred
 * answers (plugin ABI 1.3: nbnet_defer / nbnet_answer).
 *
 *   [[plugins]]
 *   name = "delay"
 *   path = "target/release/libdelay_c.so"
 *   config = { ms = 50 }
 *
 * The thread starts in init (in the worker, after fork: never at dlopen)
 * and is stopped and joined in destroy. Builds as C and as C++.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nbnet_plugin.h"

typedef struct job {
    struct job *next;
    struct timespec at;  /* when to answer (CLOCK_REALTIME) */
    nbnet_deferred *d;   /* the request's completion handle */
    size_t len;
    uint8_t *bytes;      /* a copy of the request: the answer */
} job;

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    job *head, *tail;    /* in deadline order: every job waits the same time */
    int stop;
    long ms;
    pthread_t thread;
} delay_state;

static int before(const struct timespec *a, const struct timespec *b) {
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static void *timer(void *arg) {
    delay_state *s = (delay_state *)arg;
    pthread_mutex_lock(&s->lock);
    while (!s->stop) {
        if (s->head == NULL) {
            pthread_cond_wait(&s->wake, &s->lock);
            continue;
        }
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        if (before(&now, &s->head->at)) {
            pthread_cond_timedwait(&s->wake, &s->lock, &s->head->at);
            continue;
        }
        job *j = s->head;
        s->head = j->next;
        if (s->head == NULL) {
            s->tail = NULL;
        }
        pthread_mutex_unlock(&s->lock);
        /* Any thread may complete a handle; the host copies the bytes. */
        nbnet_answer(j->d, j->bytes, j->len);
        free(j->bytes);
        free(j);
        pthread_mutex_lock(&s->lock);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static int delay_init(const nbnet_init_ctx *ctx, void **state) {
    delay_state *s = (delay_state *)calloc(1, sizeof(delay_state));
    if (s == NULL) {
        ctx->set_error(ctx, "out of memory", 13);
        return NBNET_ERR;
    }
    const char *ms = ctx->config_get(ctx, "ms");
    s->ms = ms != NULL ? atol(ms) : 10;
    if (s->ms < 0 || s->ms > 3600000) {
        free(s);
        ctx->set_error(ctx, "ms must be between 0 and 3600000", 32);
        return NBNET_ERR;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->wake, NULL);
    if (pthread_create(&s->thread, NULL, timer, s) != 0) {
        free(s);
        ctx->set_error(ctx, "cannot start the timer thread", 29);
        return NBNET_ERR;
    }
    *state = s;
    return NBNET_OK;
}

static int delay_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    delay_state *s = (delay_state *)state;
    job *j = (job *)calloc(1, sizeof(job));
    uint8_t *copy = (uint8_t *)malloc(len);
    if (j == NULL || copy == NULL) {
        free(j);
        free(copy);
        return nbnet_error(resp, "out of memory", 13);
    }
    /* The request is valid only during this call: keep a copy. */
    memcpy(copy, req, len);
    nbnet_deferred *d = nbnet_defer(resp);
    if (d == NULL) {
        free(j);
        free(copy);
        return nbnet_error(resp, "the host refused to defer", 25);
    }
    clock_gettime(CLOCK_REALTIME, &j->at);
    j->at.tv_sec += s->ms / 1000;
    j->at.tv_nsec += (s->ms % 1000) * 1000000L;
    if (j->at.tv_nsec >= 1000000000L) {
        j->at.tv_sec += 1;
        j->at.tv_nsec -= 1000000000L;
    }
    j->d = d;
    j->len = len;
    j->bytes = copy;
    pthread_mutex_lock(&s->lock);
    if (s->tail != NULL) {
        s->tail->next = j;
    } else {
        s->head = j;
    }
    s->tail = j;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    return NBNET_OK; /* nothing written: the answer comes later */
}

static void delay_destroy(void *state) {
    delay_state *s = (delay_state *)state;
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    /* Requests still waiting fail (their connections are closing anyway). */
    while (s->head != NULL) {
        job *j = s->head;
        s->head = j->next;
        nbnet_fail(j->d, "the plugin is stopping", 22);
        free(j->bytes);
        free(j);
    }
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static const nbnet_plugin plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "delay-c",
    .version = "0.1.0",
    .init = delay_init,
    .process = delay_process,
    .destroy = delay_destroy,
    .on_open = NULL,
    .on_close = NULL,
    .on_shutdown = NULL,
    .process_batch = NULL,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) {
    return &plugin;
}
