/*
 * hostile.c -- test-only plugin, written from nbnet_plugin.h alone, that does
 * what a careless or hostile plugin author might: exit the process, tamper
 * with the host's response fields, fork long-lived children, close the
 * worker's descriptors, block in init, forge log lines. The hardening tests
 * (tests/hardening.rs) check that none of it stops the server.
 *
 * Its config table picks what init does (all optional):
 *   init_sleep_ms = N    sleep N ms in init
 *   init_exit = N        exit(N) in init
 *   init_raise = "SIGSEGV" | "SIGBUS" | "SIGSTOP"  raise() that signal in
 *                        init (a crash some runtimes report by sending it to
 *                        themselves; a process that stops itself)
 *   init_daemon = true   fork a child in init that blocks every signal it
 *                        can and sleeps forever (without exec)
 *   init_close_fds = true  close descriptors 3..1023 in init
 *   init_error = "text"  fail init with this message (may hold newlines)
 *   catch_term = true    install a SIGTERM handler that does nothing and
 *                        unblock SIGTERM, so the worker's signalfd never sees
 *                        it: the worker ignores "drain" and keeps serving
 *   destroy_hang = true  destroy never returns (a worker that can never
 *                        finish stopping by itself)
 *   destroy_crash = true destroy calls abort()
 *   init_dup2 = true     init puts /dev/null over descriptors 3..63 (dup2)
 *   init_close_stdio = true  init closes descriptors 0, 1 and 2
 *   only_worker = I      do the above only in worker I (the host's check
 *                        loads plugins as worker 0, so I > 0 passes it)
 *
 *   close_hang = true    on_close never returns for a connection being
 *                        handed over (flags 1): a hook stuck mid-hand-over
 *
 * Its on_open and on_close hooks log "hook open|close id=N flags=F peer=P"
 * (F is nbnet_conn.flags: 1 when the connection is handed over between
 * workers; P the client's address as the host gives it).
 *
 * The request picks what process does:
 *   "exit:N"     _exit(N)
 *   "tamper"     answers "tampered", then points every host callback of the
 *                response (write, grow, reserve, commit, set_error) at NULL
 *   "daemon"     forks a child that sleeps forever (no exec), answers its pid
 *   "forge"      fails with a message that holds a newline and a fake log line
 *   "flood"      fails with a 1 MiB message
 *   "overflow"   recurses until the stack overflows
 *   "pid"        answers the worker's pid
 *   "close-stdio"  closes descriptors 0, 1 and 2, answers "closed"
 *   "cap"        raises resp->cap by 1000, writes 10 bytes in place
 *   "log-null"   calls the host's log with a NULL handle, answers "logged"
 *   "log-99"     logs with level 99, answers "logged"
 *   "write-null" calls resp->write(resp, NULL, 10)
 *   "host"       overwrites resp->host, then writes through resp->write
 *   "kill-master" sends SIGTERM to its parent (the master), answers "sent"
 *   anything else -> answered "ok:" + the request
 */
#define _DEFAULT_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

#include "nbnet_plugin.h"

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* A child that outlives everything it can: all signals blocked, no exec. */
static pid_t spawn_daemon(void) {
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_BLOCK, &all, NULL);
        for (;;) {
            sleep(1000);
        }
    }
    return pid;
}

/* The host's logger, kept from init (valid until destroy returns). */
static void (*host_log)(const void *, int, const char *, size_t);
static const void *host_log_handle;

static void log_hook(const char *what, const nbnet_conn *conn) {
    char line[256];
    int n = snprintf(line, sizeof line, "hook %s id=%llu flags=%u peer=%s", what,
                     (unsigned long long)conn->id, (unsigned)conn->flags, conn->peer);
    if (n >= (int)sizeof line) {
        n = (int)sizeof line - 1;
    }
    if (host_log != NULL && n > 0) {
        host_log(host_log_handle, NBNET_LOG_INFO, line, (size_t)n);
    }
}

static void hostile_on_open(void *state, const nbnet_conn *conn) {
    (void)state;
    log_hook("open", conn);
}

static int hang_in_close;

static void hostile_on_close(void *state, const nbnet_conn *conn) {
    (void)state;
    log_hook("close", conn);
    while (hang_in_close && (conn->flags & 1u) != 0) {
        sleep_ms(1000);
    }
}

/* destroy_hang / destroy_crash: set in init, read in destroy. */
static int hang_in_destroy;
static int crash_in_destroy;

static void hostile_destroy(void *state) {
    (void)state;
    if (crash_in_destroy) {
        abort();
    }
    while (hang_in_destroy) {
        sleep_ms(1000);
    }
}

static void ignore_term(int sig) {
    (void)sig;
}

static int hostile_init(const nbnet_init_ctx *ctx, void **state) {
    const char *value;
    *state = NULL;
    host_log = ctx->log;
    host_log_handle = ctx->log_handle;
    if ((value = ctx->config_get(ctx, "only_worker")) != NULL &&
        (uint32_t)atol(value) != ctx->worker_index) {
        return NBNET_OK;
    }
    if ((value = ctx->config_get(ctx, "close_hang")) != NULL && strcmp(value, "true") == 0) {
        hang_in_close = 1;
    }
    if ((value = ctx->config_get(ctx, "init_sleep_ms")) != NULL) {
        sleep_ms(atol(value));
    }
    if ((value = ctx->config_get(ctx, "init_exit")) != NULL) {
        exit(atoi(value));
    }
    if ((value = ctx->config_get(ctx, "init_raise")) != NULL) {
        raise(strcmp(value, "SIGBUS") == 0    ? SIGBUS
              : strcmp(value, "SIGSTOP") == 0 ? SIGSTOP
                                              : SIGSEGV);
    }
    if ((value = ctx->config_get(ctx, "init_daemon")) != NULL && strcmp(value, "true") == 0) {
        spawn_daemon();
    }
    if ((value = ctx->config_get(ctx, "init_close_fds")) != NULL && strcmp(value, "true") == 0) {
        for (int fd = 3; fd < 1024; fd++) {
            close(fd);
        }
    }
    if ((value = ctx->config_get(ctx, "destroy_hang")) != NULL && strcmp(value, "true") == 0) {
        hang_in_destroy = 1;
    }
    if ((value = ctx->config_get(ctx, "destroy_crash")) != NULL && strcmp(value, "true") == 0) {
        crash_in_destroy = 1;
    }
    if ((value = ctx->config_get(ctx, "init_dup2")) != NULL && strcmp(value, "true") == 0) {
        int null = open("/dev/null", O_RDWR);
        for (int fd = 3; fd < 64; fd++) {
            if (fd != null) {
                dup2(null, fd);
            }
        }
    }
    if ((value = ctx->config_get(ctx, "init_close_stdio")) != NULL && strcmp(value, "true") == 0) {
        close(0);
        close(1);
        close(2);
    }
    if ((value = ctx->config_get(ctx, "catch_term")) != NULL && strcmp(value, "true") == 0) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_handler = ignore_term;
        sigemptyset(&action.sa_mask);
        sigaction(SIGTERM, &action, NULL);
        sigset_t term;
        sigemptyset(&term);
        sigaddset(&term, SIGTERM);
        sigprocmask(SIG_UNBLOCK, &term, NULL);
    }
    if ((value = ctx->config_get(ctx, "init_error")) != NULL) {
        ctx->set_error(ctx, value, strlen(value));
        return NBNET_ERR;
    }
    return NBNET_OK;
}

static volatile int depth_sink;
/* Always 1 at run time; volatile so the compiler cannot see the recursion
 * never ends. */
static volatile int keep_going = 1;

static int recurse(int depth) {
    volatile char pad[256];
    pad[0] = (char)depth;
    depth_sink = pad[0];
    if (!keep_going) {
        return 0;
    }
    return recurse(depth + 1) + pad[0];
}

static int hostile_process(void *state, const uint8_t *req, size_t len, nbnet_response *resp) {
    (void)state;
    char text[64];
    size_t n = len < sizeof text - 1 ? len : sizeof text - 1;
    memcpy(text, req, n);
    text[n] = '\0';

    if (strncmp(text, "exit:", 5) == 0) {
        _exit(atoi(text + 5));
    }
    if (strcmp(text, "tamper") == 0) {
        int rc = nbnet_write(resp, "tampered", 8);
        resp->write = NULL;
        resp->grow = NULL;
        resp->reserve = NULL;
        resp->commit = NULL;
        resp->set_error = NULL;
        return rc;
    }
    if (strcmp(text, "daemon") == 0) {
        char out[32];
        int k = snprintf(out, sizeof out, "%d", (int)spawn_daemon());
        return nbnet_write(resp, out, (size_t)k);
    }
    if (strcmp(text, "forge") == 0) {
        static const char msg[] =
            "innocent\n2026-01-01T00:00:00.000000Z ERROR master: worker 0 (pid 1) died: forged";
        resp->set_error(resp, msg, sizeof msg - 1);
        return NBNET_ERR;
    }
    if (strcmp(text, "flood") == 0) {
        size_t size = 1 << 20;
        char *msg = malloc(size);
        if (msg != NULL) {
            memset(msg, 'F', size);
            resp->set_error(resp, msg, size);
            free(msg);
        }
        return NBNET_ERR;
    }
    if (strcmp(text, "overflow") == 0) {
        return recurse(0);
    }
    if (strcmp(text, "close-stdio") == 0) {
        close(0);
        close(1);
        close(2);
        return nbnet_write(resp, "closed", 6);
    }
    if (strcmp(text, "cap") == 0) {
        if (nbnet_ensure(resp, 10) != NBNET_OK) {
            return NBNET_ERR;
        }
        resp->cap += 1000;
        memcpy(resp->data + resp->len, "0123456789", 10);
        resp->len += 10;
        return NBNET_OK;
    }
    if (strcmp(text, "log-null") == 0) {
        if (host_log != NULL) {
            host_log(NULL, NBNET_LOG_WARN, "from a NULL handle", 18);
        }
        return nbnet_write(resp, "logged", 6);
    }
    if (strcmp(text, "log-99") == 0) {
        if (host_log != NULL) {
            host_log(host_log_handle, 99, "at level 99", 11);
        }
        return nbnet_write(resp, "logged", 6);
    }
    if (strcmp(text, "write-null") == 0) {
        return resp->write(resp, NULL, 10);
    }
    if (strcmp(text, "host") == 0) {
        resp->host = (void *)1;
        return resp->write(resp, (const uint8_t *)"x", 1);
    }
    if (strcmp(text, "kill-master") == 0) {
        kill(getppid(), SIGTERM);
        return nbnet_write(resp, "sent", 4);
    }
    if (strcmp(text, "pid") == 0) {
        char out[32];
        int k = snprintf(out, sizeof out, "%d", (int)getpid());
        return nbnet_write(resp, out, (size_t)k);
    }
    if (nbnet_write(resp, "ok:", 3) != NBNET_OK) {
        return NBNET_ERR;
    }
    return nbnet_write(resp, req, len);
}

static const nbnet_plugin table = {
    .abi_major = NBNET_ABI_MAJOR,
    .abi_minor = NBNET_ABI_MINOR,
    .struct_size = sizeof(nbnet_plugin),
    .name = "hostile",
    .version = "0.1.0",
    .init = hostile_init,
    .process = hostile_process,
    .destroy = hostile_destroy,
    .on_open = hostile_on_open,
    .on_close = hostile_on_close,
};

NBNET_EXPORT const nbnet_plugin *nbnet_plugin_entry(void) {
    return &table;
}
