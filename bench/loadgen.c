/*
 * policyd benchmark load generator (compiled by bench/build.py with gcc -O2).
 *
 * Shapes:
 *   exim     one connection per query, as Exim's ${readsocket} does it: connect, write
 *            one request line, shutdown(SHUT_WR), read to EOF, close.
 *   postfix  C persistent connections, lock-step: write one request block (attributes and
 *            the empty line), read until the reply's "\n\n", repeat.
 *   exec     fork-exec one command per query (the old Exim ${run} recipe); the answer is
 *            the exit status.  Requests are tab-separated argument lists.
 *
 * One thread, epoll, C concurrent slots.  Closed loop by default; --rate R issues requests
 * on a fixed schedule and measures latency from the scheduled start (so a stalled server
 * is charged for the queue it causes).  --poisson makes the schedule open-loop Poisson
 * arrivals (exponential gaps of mean 1/R, seeded by --seed: the same schedule for every
 * server).  With --rate the measured requests are those *scheduled* inside the window,
 * each waited for until it completes (or --timeout): a server that stalls at the end of
 * the window cannot drop its slowest requests from the figures.  A request due while all
 * C slots are busy waits for one, and that wait counts (no coordinated omission); the
 * output's "late_starts" counts them and "max_start_lag_ms" says how late the worst one
 * started.  Requests come from a file and are used round-robin
 * (exim/exec: one per line; postfix: blocks ended by an empty line), from --start on, so
 * that consecutive runs can walk through the file instead of replaying its beginning.
 *
 * Output: one JSON object on stdout with count, errors, qps and latency percentiles in
 * milliseconds, and a count of replies by their first word (a sanity check on the mix).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

enum { M_EXIM, M_POSTFIX, M_EXEC };
enum { S_IDLE, S_CONNECTING, S_WRITING, S_READING, S_RETRY };

typedef struct {
    int fd;
    int state;
    int req;
    double start;      /* when the request was due (rate) or started (closed loop) */
    size_t sent;
    char *rbuf;
    size_t rlen, rcap;
    pid_t pid;
    double retry_at;
} slot_t;

typedef struct { const char *p; size_t n; } req_t;

static int mode = M_EXIM;
static int is_unix = 1;
static struct sockaddr_un sun_addr;
static struct sockaddr_in sin_addr;
static int concurrency = 1;
static double duration = 3.0, warmup = 0.5, rate = 0.0, timeout_s = 5.0;
static long max_count = 0;
static req_t *reqs;
static int nreqs;
static long next_req, start_req;
static char **exec_argv;
static int exec_argc;
static double timeline_step = 0.0;
static int poisson = 0;
static unsigned long long rng_state = 88172645463325252ULL;
static long late_starts;
static double max_start_lag;

static double *lat;
static size_t nlat, caplat;
static long errors, connect_retries, bad_replies, timeouts;
static char kinds[32][24];
static long kind_count[32];
static int nkinds;
static char first_error[160];
static double *tl_max;
static long *tl_count;
static int tl_n;

static volatile sig_atomic_t stop_flag;
static void on_stop(int sig) { (void)sig; stop_flag = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *msg) { perror(msg); exit(2); }

static void note_error(const char *what) {
    errors++;
    if (!first_error[0]) snprintf(first_error, sizeof first_error, "%s", what);
}

static void count_kind(const char *w, size_t n) {
    if (n > sizeof kinds[0] - 1) n = sizeof kinds[0] - 1;
    for (int i = 0; i < nkinds; i++)
        if (strlen(kinds[i]) == n && memcmp(kinds[i], w, n) == 0) { kind_count[i]++; return; }
    if (nkinds < 32) {
        memcpy(kinds[nkinds], w, n);
        kinds[nkinds][n] = 0;
        kind_count[nkinds++] = 1;
    }
}

static void record(double latency_ms, double t_done, double t0) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 65536;
        lat = realloc(lat, caplat * sizeof *lat);
        if (!lat) die("realloc");
    }
    lat[nlat++] = latency_ms;
    if (tl_n) {
        int b = (int)((t_done - t0) / timeline_step);
        if (b >= 0 && b < tl_n) {
            tl_count[b]++;
            if (latency_ms > tl_max[b]) tl_max[b] = latency_ms;
        }
    }
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc(n + 1);
    if (!buf || fread(buf, 1, n, f) != (size_t)n) die("read requests");
    buf[n] = 0;
    fclose(f);
    *len = n;
    return buf;
}

static void load_requests(const char *path) {
    size_t n;
    char *buf = read_file(path, &n);
    int cap = 1024;
    reqs = malloc(cap * sizeof *reqs);
    size_t i = 0;
    while (i < n) {
        size_t j;
        if (mode == M_POSTFIX) {
            /* a block ends with "\n\n" */
            char *e = memmem(buf + i, n - i, "\n\n", 2);
            j = e ? (size_t)(e - buf) + 2 : n;
        } else {
            char *e = memchr(buf + i, '\n', n - i);
            j = e ? (size_t)(e - buf) + 1 : n;
        }
        if (j - i > 1) {
            if (nreqs == cap) { cap *= 2; reqs = realloc(reqs, cap * sizeof *reqs); }
            reqs[nreqs].p = buf + i;
            reqs[nreqs].n = j - i;
            nreqs++;
        }
        i = j;
    }
    if (nreqs == 0) { fprintf(stderr, "no requests in %s\n", path); exit(2); }
}

static void parse_target(const char *t) {
    if (strncmp(t, "unix:", 5) == 0) {
        is_unix = 1;
        memset(&sun_addr, 0, sizeof sun_addr);
        sun_addr.sun_family = AF_UNIX;
        snprintf(sun_addr.sun_path, sizeof sun_addr.sun_path, "%s", t + 5);
    } else if (strncmp(t, "tcp:", 4) == 0) {
        is_unix = 0;
        char host[64];
        const char *colon = strrchr(t + 4, ':');
        if (!colon) { fprintf(stderr, "tcp:HOST:PORT\n"); exit(2); }
        snprintf(host, sizeof host, "%.*s", (int)(colon - (t + 4)), t + 4);
        memset(&sin_addr, 0, sizeof sin_addr);
        sin_addr.sin_family = AF_INET;
        sin_addr.sin_port = htons(atoi(colon + 1));
        if (inet_pton(AF_INET, host, &sin_addr.sin_addr) != 1) { fprintf(stderr, "bad host\n"); exit(2); }
    } else if (mode != M_EXEC) {
        fprintf(stderr, "target must be unix:PATH or tcp:HOST:PORT\n");
        exit(2);
    }
}

static int ep;

static void close_slot(slot_t *s) {
    if (s->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
        s->fd = -1;
    }
}

static void watch(slot_t *s, uint32_t events, int add) {
    struct epoll_event ev = { .events = events, .data.ptr = s };
    if (epoll_ctl(ep, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, s->fd, &ev) < 0) die("epoll_ctl");
}

/* Open a connection on s->fd.  Returns 1 if connected, 0 if in progress, -1 to retry later,
 * -2 on a hard error. */
static int open_conn(slot_t *s, int blocking) {
    int fd = socket(is_unix ? AF_UNIX : AF_INET,
                    SOCK_STREAM | SOCK_CLOEXEC | (blocking ? 0 : SOCK_NONBLOCK), 0);
    if (fd < 0) die("socket");
    if (!is_unix) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    int r = is_unix ? connect(fd, (struct sockaddr *)&sun_addr, sizeof sun_addr)
                    : connect(fd, (struct sockaddr *)&sin_addr, sizeof sin_addr);
    s->fd = fd;
    if (r == 0) return 1;
    if (errno == EINPROGRESS) return 0;
    close(fd);
    s->fd = -1;
    if (errno == EAGAIN || errno == ECONNREFUSED || errno == EADDRNOTAVAIL) return -1;
    return -2;
}

static int pick_request(void) { return (int)(next_req++ % nreqs); }

/* Try to write the rest of the request; returns 1 when all sent, 0 if blocked, -1 error. */
static int do_write(slot_t *s) {
    const req_t *r = &reqs[s->req];
    while (s->sent < r->n) {
        ssize_t w = send(s->fd, r->p + s->sent, r->n - s->sent, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) return 0;
            return -1;
        }
        s->sent += w;
    }
    if (mode == M_EXIM) shutdown(s->fd, SHUT_WR);
    return 1;
}

static void fail(slot_t *s, const char *what) {
    note_error(what);
    close_slot(s);
    s->state = S_IDLE;
}

static void begin_write(slot_t *s) {
    s->sent = 0;
    s->rlen = 0;
    int w = do_write(s);
    if (w < 0) { fail(s, "write failed"); return; }
    if (w == 0) { s->state = S_WRITING; watch(s, EPOLLOUT, 0); return; }
    s->state = S_READING;
    watch(s, EPOLLIN, 0);
}

static double t_measure0, t_measure1;

/* xorshift64*: a reproducible schedule, independent of libc's generators. */
static double uniform01(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return ((rng_state * 2685821657736338717ULL) >> 11) * (1.0 / 9007199254740992.0);
}

static double next_gap(double interval) {
    if (!poisson) return interval;
    return -log(1.0 - uniform01()) * interval;
}

static void start_request(slot_t *s, double start) {
    s->req = pick_request();
    s->start = start;
    if (mode == M_EXIM) {
        int r = open_conn(s, 0);
        if (r == -1) { connect_retries++; s->state = S_RETRY; s->retry_at = now() + 0.0005; return; }
        if (r == -2) { note_error("connect failed"); s->state = S_IDLE; return; }
        watch(s, EPOLLOUT, 1);
        if (r == 0) { s->state = S_CONNECTING; return; }
        begin_write(s);
    } else {
        if (s->fd < 0) {
            int r = open_conn(s, 1);
            if (r != 1) { note_error("connect failed"); s->state = S_RETRY; s->retry_at = now() + 0.01; return; }
            watch(s, EPOLLOUT, 1);
        }
        begin_write(s);
    }
}

static void complete(slot_t *s, double t) {
    const char *b = s->rbuf;
    size_t n = s->rlen;
    int ok = 1;
    if (mode == M_EXIM) {
        if (n == 0 || b[n - 1] == '\n') ok = 0;       /* one line, no trailing newline */
        size_t w = 0;
        while (w < n && b[w] != ' ') w++;
        if (ok) count_kind(b, w);
    } else {
        if (n < 9 || memcmp(b, "action=", 7) != 0) ok = 0;
        else {
            size_t w = 7;
            while (w < n && b[w] != ' ' && b[w] != '\n') w++;
            count_kind(b + 7, w - 7);
        }
    }
    if (!ok) {
        bad_replies++;
        if (!first_error[0])
            snprintf(first_error, sizeof first_error, "bad reply: %.*s", (int)(n > 100 ? 100 : n), b);
    }
    double at = rate > 0 ? s->start : t;  /* open loop: by scheduled time */
    if (at >= t_measure0 && at <= t_measure1) {
        if (ok) record((t - s->start) * 1e3, t, t_measure0);
        else errors++;
    }
    if (mode == M_EXIM) close_slot(s);
    s->state = S_IDLE;
}

static void on_event(slot_t *s, uint32_t ev) {
    if (s->state == S_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) { fail(s, "connect failed"); return; }
        begin_write(s);
        return;
    }
    if (s->state == S_WRITING) {
        int w = do_write(s);
        if (w < 0) { fail(s, "write failed"); return; }
        if (w == 1) { s->state = S_READING; watch(s, EPOLLIN, 0); }
        return;
    }
    if (s->state == S_READING) {
        for (;;) {
            if (s->rcap - s->rlen < 4096) {
                s->rcap = s->rcap * 2 + 8192;
                s->rbuf = realloc(s->rbuf, s->rcap);
            }
            ssize_t r = recv(s->fd, s->rbuf + s->rlen, s->rcap - s->rlen, 0);
            if (r > 0) {
                s->rlen += r;
                if (mode == M_POSTFIX && s->rlen >= 2 && s->rbuf[s->rlen - 1] == '\n'
                    && s->rbuf[s->rlen - 2] == '\n') {
                    complete(s, now());
                    return;
                }
                continue;
            }
            if (r == 0) {
                if (mode == M_EXIM) complete(s, now());
                else fail(s, "server closed the connection");
                return;
            }
            if (errno == EAGAIN) return;
            if (errno == ECONNRESET && mode == M_EXIM && s->rlen > 0) { complete(s, now()); return; }
            fail(s, "read failed");
            return;
        }
    }
    (void)ev;
}

/* ---- exec mode: fork-exec a command per query, the answer is its exit status ---- */

static char **build_argv(int req) {
    static char *argv[64];
    static char line[8192];
    int n = 0;
    for (int i = 0; i < exec_argc && n < 60; i++) argv[n++] = exec_argv[i];
    size_t len = reqs[req].n;
    if (len >= sizeof line) len = sizeof line - 1;
    memcpy(line, reqs[req].p, len);
    line[len] = 0;
    if (len && line[len - 1] == '\n') line[--len] = 0;
    char *p = line;
    while (n < 63) {
        argv[n++] = p;
        char *tab = strchr(p, '\t');
        if (!tab) break;
        *tab = 0;
        p = tab + 1;
    }
    argv[n] = NULL;
    return argv;
}

static int run_exec(slot_t *slots) {
    double t_start = now();
    t_measure0 = t_start + warmup;
    t_measure1 = max_count ? 1e18 : t_measure0 + duration;
    int running = 0;
    long issued = 0;
    for (;;) {
        double t = now();
        if (stop_flag && t < t_measure1) t_measure1 = t > t_measure0 ? t : t_measure0;
        int stop = t >= t_measure1 || (max_count && (long)nlat >= max_count);
        for (int i = 0; i < concurrency && !stop; i++) {
            if (slots[i].pid) continue;
            slots[i].req = pick_request();
            slots[i].start = now();
            pid_t pid;
            if (posix_spawn(&pid, exec_argv[0], NULL, NULL, build_argv(slots[i].req), environ) != 0) {
                note_error("spawn failed");
                continue;
            }
            slots[i].pid = pid;
            running++;
            issued++;
        }
        if (!running) break;
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            die("waitpid");
        }
        double done = now();
        for (int i = 0; i < concurrency; i++) {
            if (slots[i].pid != pid) continue;
            slots[i].pid = 0;
            running--;
            if (WIFEXITED(status)) {
                char w[16];
                int n = snprintf(w, sizeof w, "exit%d", WEXITSTATUS(status));
                count_kind(w, n);
                if (WEXITSTATUS(status) > 3) note_error("exit status > 3");
                else if (done >= t_measure0 && done <= t_measure1) record((done - slots[i].start) * 1e3, done, t_measure0);
            } else {
                note_error("killed by a signal");
            }
        }
    }
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!nlat) return 0;
    size_t i = (size_t)ceil(p * nlat);
    if (i < 1) i = 1;
    if (i > nlat) i = nlat;
    return lat[i - 1];
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --mode exim|postfix|exec --requests FILE [--target unix:PATH|tcp:HOST:PORT]\n"
            "       [--concurrency C] [--duration S] [--warmup S] [--count N] [--rate R]\n"
            "       [--timeout S] [--timeline STEP] [--start INDEX] [--poisson 0|1] [--seed N]\n"
            "       [-- COMMAND ARGS... (exec mode)]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *target = NULL, *reqfile = NULL;
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--") == 0) { exec_argv = argv + i + 1; exec_argc = argc - i - 1; break; }
        if (!v) usage();
        if (strcmp(a, "--mode") == 0) {
            mode = strcmp(v, "exim") == 0 ? M_EXIM : strcmp(v, "postfix") == 0 ? M_POSTFIX
                 : strcmp(v, "exec") == 0 ? M_EXEC : -1;
            if (mode < 0) usage();
        } else if (strcmp(a, "--target") == 0) target = v;
        else if (strcmp(a, "--requests") == 0) reqfile = v;
        else if (strcmp(a, "--concurrency") == 0) concurrency = atoi(v);
        else if (strcmp(a, "--duration") == 0) duration = atof(v);
        else if (strcmp(a, "--warmup") == 0) warmup = atof(v);
        else if (strcmp(a, "--count") == 0) max_count = atol(v);
        else if (strcmp(a, "--rate") == 0) rate = atof(v);
        else if (strcmp(a, "--timeout") == 0) timeout_s = atof(v);
        else if (strcmp(a, "--timeline") == 0) timeline_step = atof(v);
        else if (strcmp(a, "--start") == 0) start_req = atol(v);
        else if (strcmp(a, "--poisson") == 0) poisson = atoi(v);
        else if (strcmp(a, "--seed") == 0) rng_state = strtoull(v, NULL, 10) * 2654435761ULL + 1;
        else usage();
        i++;
    }
    if (!reqfile || concurrency < 1 || concurrency > 4096) usage();
    if (mode != M_EXEC && !target) usage();
    if (mode == M_EXEC && exec_argc < 1) usage();
    if (target) parse_target(target);
    load_requests(reqfile);
    next_req = start_req > 0 ? start_req % nreqs : 0;
    start_req = next_req;

    slot_t *slots = calloc(concurrency, sizeof *slots);
    for (int i = 0; i < concurrency; i++) slots[i].fd = -1;
    if (timeline_step > 0) {
        tl_n = (int)(duration / timeline_step) + 2;
        tl_max = calloc(tl_n, sizeof *tl_max);
        tl_count = calloc(tl_n, sizeof *tl_count);
    }

    double t_begin = now();
    if (mode == M_EXEC) {
        run_exec(slots);
    } else {
        ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0) die("epoll_create1");
        if (mode == M_POSTFIX) {
            /* Persistent connections are opened before the clock starts: a connect that
             * waits out a full listen queue is not a request's latency. */
            for (int i = 0; i < concurrency; i++) {
                if (open_conn(&slots[i], 1) != 1) die("connect");
                watch(&slots[i], EPOLLIN, 1);
            }
            t_begin = now();
        }
        t_measure0 = t_begin + warmup;
        t_measure1 = max_count ? 1e18 : t_measure0 + duration;
        double interval = rate > 0 ? 1.0 / rate : 0;
        double next_due = t_begin;
        struct epoll_event evs[256];
        for (;;) {
            double t = now();
            if (stop_flag && t < t_measure1) t_measure1 = t > t_measure0 ? t : t_measure0;
            /* open loop: issue everything scheduled inside the window, then drain */
            int stopping = (rate > 0 ? next_due > t_measure1 : t > t_measure1)
                           || (max_count && (long)nlat >= max_count);
            int busy = 0;
            double wake = t + 0.05;
            for (int i = 0; i < concurrency; i++) {
                slot_t *s = &slots[i];
                if (s->state == S_RETRY) {
                    if (stopping) { s->state = S_IDLE; continue; }
                    if (t < s->retry_at) { busy++; if (s->retry_at < wake) wake = s->retry_at; continue; }
                    s->state = S_IDLE;
                }
                if (s->state == S_IDLE && !stopping) {
                    if (rate > 0) {
                        if (t >= next_due) {
                            double lag = t - next_due;
                            if (lag > 0.0005) late_starts++;
                            if (lag > max_start_lag) max_start_lag = lag;
                            start_request(s, next_due);
                            next_due += next_gap(interval);
                        }
                        else if (next_due < wake) wake = next_due;
                    } else {
                        start_request(s, t);
                    }
                }
                if (s->state != S_IDLE) {
                    busy++;
                    if (!stopping && s->start + timeout_s < t) {
                        timeouts++;
                        fail(s, "timeout");
                    }
                }
            }
            if (stopping && !busy) break;
            if (stopping && t > t_measure1 + timeout_s) break;
            if (stop_flag && t > t_measure1 + 0.2) break;
            /* Sleep until the next due time with nanosecond precision: spinning here
             * (epoll_wait with a 0 ms timeout) would burn the client CPU, and on a
             * virtual machine that can slow the server's CPU too. */
            double left = wake - now();
            if (left < 0) left = 0;
            struct timespec ts = { .tv_sec = (time_t)left,
                                   .tv_nsec = (long)((left - (time_t)left) * 1e9) };
            int n = epoll_pwait2(ep, evs, 256, &ts, NULL);
            if (n < 0 && errno != EINTR) die("epoll_wait");
            for (int k = 0; k < n; k++) on_event(evs[k].data.ptr, evs[k].events);
        }
        for (int i = 0; i < concurrency; i++) close_slot(&slots[i]);
    }
    double measured = max_count ? (now() - t_measure0) : t_measure1 - t_measure0;
    if (tl_n) {
        int used = (int)(measured / timeline_step) + 1;
        if (used < tl_n) tl_n = used;
    }
    qsort(lat, nlat, sizeof *lat, cmp_double);
    double sum = 0;
    for (size_t i = 0; i < nlat; i++) sum += lat[i];

    printf("{\"mode\": \"%s\", \"target\": \"%s\", \"concurrency\": %d, \"rate\": %.1f, "
           "\"duration\": %.3f, \"count\": %zu, \"errors\": %ld, \"bad_replies\": %ld, "
           "\"timeouts\": %ld, \"connect_retries\": %ld, \"issued\": %ld, \"requests_in_file\": %d, "
           "\"poisson\": %d, \"late_starts\": %ld, \"max_start_lag_ms\": %.3f, "
           "\"qps\": %.1f, \"mean_ms\": %.4f, "
           "\"p50_ms\": %.4f, \"p99_ms\": %.4f, \"p999_ms\": %.4f, \"max_ms\": %.4f, ",
           mode == M_EXIM ? "exim" : mode == M_POSTFIX ? "postfix" : "exec",
           target ? target : exec_argv[0], concurrency, rate, measured, nlat, errors,
           bad_replies, timeouts, connect_retries, next_req - start_req, nreqs,
           poisson, late_starts, max_start_lag * 1e3,
           measured > 0 ? nlat / measured : 0,
           nlat ? sum / nlat : 0, pct(0.5), pct(0.99), pct(0.999), nlat ? lat[nlat - 1] : 0);
    printf("\"first_error\": \"");
    for (const char *p = first_error; *p; p++) {
        if (*p == '"' || *p == '\\') putchar('\\');
        putchar((unsigned char)*p < 32 ? ' ' : *p);
    }
    printf("\", \"replies\": {");
    for (int i = 0; i < nkinds; i++) {
        printf("%s\"", i ? ", " : "");
        for (const char *p = kinds[i]; *p; p++) {
            if (*p == '"' || *p == '\\') putchar('\\');
            putchar((unsigned char)*p < 32 ? '?' : *p);
        }
        printf("\": %ld", kind_count[i]);
    }
    printf("}");
    if (tl_n) {
        printf(", \"timeline_step\": %.3f, \"timeline_max_ms\": [", timeline_step);
        for (int i = 0; i < tl_n; i++) printf("%s%.3f", i ? ", " : "", tl_max[i]);
        printf("], \"timeline_count\": [");
        for (int i = 0; i < tl_n; i++) printf("%s%ld", i ? ", " : "", tl_count[i]);
        printf("]");
    }
    printf("}\n");
    return 0;
}
