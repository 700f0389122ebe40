/*
 * Test plugin (C): answers later through nbnet_defer (ABI 1.3), from a
 * timer thread it starts in init (in the worker, after fork).
 *
 * Requests (text; PAYLOAD is answered back as is):
 *   later MS PAYLOAD   answered from the timer thread after MS ms
 *   double PAYLOAD     answered with PAYLOAD, then answered again 100 ms
 *                      later: the second nbnet_answer must return NBNET_ERR
 *   doubled            inline: "refused" if every second completion so far
 *                      returned NBNET_ERR, else "accepted"
 *   fail MSG           deferred, then failed from the thread with MSG
 *   never              deferred and never completed
 *   both PAYLOAD       deferred, then (wrongly) PAYLOAD written inline as
 *                      well: the host must fail the request and send none
 *                      of it
 *   inline PAYLOAD     answered inline
 *   anything else      echoed inline
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nbnet_plugin.h"

enum kind { ANSWER, DOUBLE, FAIL };

typedef struct job {
    struct job *next;
    struct timespec at;
    nbnet_deferred *d;
    enum kind kind;
    size_t len;
    uint8_t bytes[]; /* the answer, or the failure message */
} job;

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    job *jobs; /* sorted by `at` */
    int stop;
    pthread_t thread;
    int accepted_twice; /* a second completion that was not refused */
} state;

static int before(const struct timespec *a, const struct timespec *b) {
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static void *timer(void *arg) {
    state *s = arg;
    pthread_mutex_lock(&s->lock);
    while (!s->stop) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        if (s->jobs == NULL) {
            pthread_cond_wait(&s->wake, &s->lock);
            continue;
        }
        if (before(&now, &s->jobs->at)) {
            pthread_cond_timedwait(&s->wake, &s->lock, &s->jobs->at);
            continue;
        }
        job *j = s->jobs;
        s->jobs = j->next;
        pthread_mutex_unlock(&s->lock);
        if (j->kind == FAIL) {
            nbnet_fail(j->d, (const char *)j->bytes, j->len);
        } else {
            nbnet_answer(j->d, j->bytes, j->len);
            if (j->kind == DOUBLE) {
                /* Later than the first: the host has delivered it by then,
                 * and nothing else completes meanwhile. */
                struct timespec pause = {0, 100 * 1000 * 1000};
                nanosleep(&pause, NULL);
                if (nbnet_answer(j->d, j->bytes, j->len) != NBNET_ERR) {
                    __atomic_store_n(&s->accepted_twice, 1, __ATOMIC_SEQ_CST);
                }
            }
        }
        free(j);
        pthread_mutex_lock(&s->lock);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static int schedule(state *s, nbnet_deferred *d, long ms, enum kind kind, const uint8_t *bytes,
                    size_t len) {
    job *j = malloc(sizeof(job) + len);
    if (j == NULL) {
        return NBNET_ERR;
    }
    clock_gettime(CLOCK_REALTIME, &j->at);
    j->at.tv_sec += ms / 1000;
    j->at.tv_nsec += (ms % 1000) * 1000000L;
    if (j->at.tv_nsec >= 1000000000L) {
        j->at.tv_sec += 1;
        j->at.tv_nsec -= 1000000000L;
    }
    j->d = d;
    j->kind = kind;
    j->len = len;
    if (len > 0) {
        memcpy(j->bytes, bytes, len);
    }
    pthread_mutex_lock(&s->lock);
    job **at = &s->jobs;
    while (*at != NULL && !before(&j->at, &(*at)->at)) {
        at = &(*at)->next;
    }
    j->next = *at;
    *at = j;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    return NBNET_OK;
}

static int starts(const uint8_t *req, size_t len, const char *word) {
    size_t n = strlen(word);
    return len >= n && memcmp(req, word, n) == 0;
}

static int deferc_init(const nbnet_init_ctx *ctx, void **out) {
    state *s = calloc(1, sizeof(state));
    if (s == NULL) {
        ctx->set_error(ctx, "out of memory", 13);
        return NBNET_ERR;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->wake, NULL);
    if (pthread_create(&s->thread, NULL, timer, s) != 0) {
        ctx->set_error(ctx, "cannot start the timer thread", 29);
        free(s);
        return NBNET_ERR;
    }
    *out = s;
    return NBNET_OK;
}

static int deferc_process(void *st, const uint8_t *req, size_t len, nbnet_response *resp) {
    state *s = st;
    if (starts(req, len, "inline ")) {
        return nbnet_write(resp, req + 7, len - 7);
    }
    if (!starts(req, len, "later ") && !starts(req, len, "double ") && !starts(req, len, "fail ") &&
        !starts(req, len, "never") && !starts(req, len, "both ") && !starts(req, len, "doubled")) {
        return nbnet_write(resp, req, len);
    }
    if (starts(req, len, "doubled")) {
        const char *verdict =
            __atomic_load_n(&s->accepted_twice, __ATOMIC_SEQ_CST) ? "accepted" : "refused";
        return nbnet_write(resp, verdict, strlen(verdict));
    }
    nbnet_deferred *d = nbnet_defer(resp);
    if (d == NULL) {
        return nbnet_error(resp, "the host refused to defer", 25);
    }
    if (starts(req, len, "never")) {
        return NBNET_OK;
    }
    if (starts(req, len, "both ")) {
        return nbnet_write(resp, req + 5, len - 5);
    }
    if (starts(req, len, "double ")) {
        return schedule(s, d, 0, DOUBLE, req + 7, len - 7);
    }
    if (starts(req, len, "fail ")) {
        return schedule(s, d, 0, FAIL, req + 5, len - 5);
    }
    if (starts(req, len, "later ")) {
        char digits[16] = {0};
        size_t i = 6, n = 0;
        while (i < len && req[i] != ' ' && n < sizeof(digits) - 1) {
            digits[n++] = (char)req[i++];
        }
        if (i < len) {
            i++; /* the space */
        }
        return schedule(s, d, atol(digits), ANSWER, req + i, len - i);
    }
    return schedule(s, d, 0, FAIL, (const uint8_t *)"unreachable", 11);
}

static void deferc_destroy(void *st) {
    state *s = st;
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    while (s->jobs != NULL) {
        job *j = s->jobs;
        s->jobs = j->next;
        nbnet_fail(j->d, "the plugin is stopping", 22);
        free(j);
    }
    free(s);
}

static const nbnet_plugin plugin = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "deferc",
    .version = "0.1.0",
    .init = deferc_init,
    .process = deferc_process,
    .destroy = deferc_destroy,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) {
    return &plugin;
}
