/* Small TCP measuring tools for `python -m bench`; C on both ends so that only the proxies
 * under test are Python (method of /work/shared/reference/perf-baselines.md).
 *
 *   netbench s PORT          epoll echo server (one thread; holds 10,000+ connections)
 *   netbench i N BLOCK NETNS HOST PORT [NETNS HOST PORT ...]
 *                            1-byte ping-pong on one or more paths, interleaved: one
 *                            connection per path, dialled from network namespace file NETNS
 *                            (/proc/self/ns/net: where netbench runs); 1,000 warm-up round
 *                            trips each, then BLOCK timed round trips per path in turn until
 *                            each has N. Prints {"paths": [...]} in order.
 *   netbench c N BLOCK NETNS HOST PORT [NETNS HOST PORT ...]
 *                            new connections one after another (connect, 1-byte echo, close),
 *                            interleaved the same way: 100 warm-up connections per path, then
 *                            BLOCK per path in turn until each has N; failures are counted; a
 *                            path's rate is its connections over the time of its own turns
 *   netbench h HOST PORT N   open N connections (each proven by a 1-byte echo), print
 *                            "ready N", hold them until stdin closes or sends a line
 * Clients print one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b) {
  long x = *(const long *)a, y = *(const long *)b;
  return x < y ? -1 : x > y;
}
static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}
static void raise_nofile(void) {
  struct rlimit r = {200000, 200000};
  if (setrlimit(RLIMIT_NOFILE, &r) != 0) {
    getrlimit(RLIMIT_NOFILE, &r);
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
}
static int dial(const char *host, int port) {
  int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  if (s < 0 || inet_pton(AF_INET, host, &a.sin_addr) != 1) return -1;
  if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { close(s); return -1; }
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return s;
}
static int echo1(int s) {
  char c = 'x';
  if (write(s, &c, 1) != 1) return -1;
  return read(s, &c, 1) == 1 ? 0 : -1;
}
static int serve(int port) {
  int one = 1, l = socket(AF_INET, SOCK_STREAM, 0), ep = epoll_create1(0);
  struct sockaddr_in a;
  struct epoll_event ev, evs[256];
  char buf[65536];
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096)) { perror("bind"); return 1; }
  ev.events = EPOLLIN;
  ev.data.fd = l;
  epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
  for (;;) {
    int n = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd == l) {
        int c = accept4(l, NULL, NULL, SOCK_NONBLOCK);
        if (c < 0) continue;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        ev.events = EPOLLIN;
        ev.data.fd = c;
        epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
        continue;
      }
      ssize_t r = read(fd, buf, sizeof buf);
      if (r > 0) {
        /* Only 1-byte messages are echoed here, so a short write never happens in practice. */
        if (write(fd, buf, (size_t)r) == r) continue;
      } else if (r < 0 && errno == EAGAIN) {
        continue;
      }
      close(fd);
    }
  }
}
static void report(const char *head, long *d, int n, int errors) {
  double sum = 0;
  qsort(d, (size_t)n, sizeof(long), cmp);
  for (int i = 0; i < n; i++) sum += (double)d[i];
  printf("{%s\"count\": %d, \"errors\": %d, \"p50_us\": %.1f, \"p99_us\": %.1f, \"mean_us\": %.1f}\n",
         head, n, errors, n ? d[n / 2] / 1e3 : 0.0, n ? d[(int)(n * 0.99)] / 1e3 : 0.0,
         n ? sum / n / 1e3 : 0.0);
}
/* One path of an interleaved run: where to dial from and to, and what it measured. */
struct path {
  int ns; /* network namespace file, open */
  const char *name, *host;
  int port, sock, ok, errors;
  long spent, *d;
};
static int enter(struct path *p) {
  if (setns(p->ns, CLONE_NEWNET) == 0) return 0;
  fprintf(stderr, "%s: setns: %s\n", p->name, strerror(errno));
  return -1;
}
/* Ping-pong on every path over one connection each, BLOCK round trips per turn. */
static int pingpong_turn(struct path *p, int k) {
  for (int i = 0; i < k; i++) {
    long t0 = now_ns();
    if (echo1(p->sock) != 0) {
      fprintf(stderr, "%s %s:%d round trip %d: %s\n", p->name, p->host, p->port, p->ok,
              errno ? strerror(errno) : "closed by peer");
      return -1;
    }
    p->d[p->ok++] = now_ns() - t0;
  }
  return 0;
}
/* New connections (connect, 1-byte echo, close), BLOCK per turn; failures are counted. */
static int connect_turn(struct path *p, int k) {
  if (enter(p) != 0) return -1;
  long start = now_ns();
  for (int i = 0; i < k; i++) {
    long t0 = now_ns();
    errno = 0;
    int s = dial(p->host, p->port);
    if (s < 0 || echo1(s) != 0) {
      if (p->errors++ < 5)
        fprintf(stderr, "%s %s:%d connection: %s %s\n", p->name, p->host, p->port,
                s < 0 ? "connect" : "echo", errno ? strerror(errno) : "closed by peer");
      if (s >= 0) close(s);
      continue;
    }
    p->d[p->ok++] = now_ns() - t0;
    close(s);
  }
  p->spent += now_ns() - start;
  return 0;
}
/* Interleaved: a slow spell of the machine lands on every path alike. */
static int interleaved(char mode, int n, int block, int count, char **spec) {
  struct path *paths = calloc((size_t)count, sizeof(struct path));
  for (int i = 0; i < count; i++) {
    struct path *p = &paths[i];
    p->name = spec[3 * i];
    p->host = spec[3 * i + 1];
    p->port = atoi(spec[3 * i + 2]);
    p->d = malloc(sizeof(long) * (size_t)(n > 1000 ? n : 1000)); /* warm-up fits too */
    p->ns = open(p->name, O_RDONLY | O_CLOEXEC);
    if (p->ns < 0) { fprintf(stderr, "%s: %s\n", p->name, strerror(errno)); return 1; }
  }
  for (int i = 0; i < count; i++) {
    struct path *p = &paths[i];
    if (enter(p) != 0) return 1;
    if (mode == 'i') {
      p->sock = dial(p->host, p->port);
      if (p->sock < 0) {
        fprintf(stderr, "%s: connect %s:%d: %s\n", p->name, p->host, p->port, strerror(errno));
        return 1;
      }
    }
  }
  /* Warm-up, not timed: 1,000 round trips, or 100 connections, per path. */
  for (int i = 0; i < count; i++) {
    struct path *p = &paths[i];
    if (mode == 'i' ? pingpong_turn(p, 1000) : connect_turn(p, 100)) return 1;
    if (mode == 'c' && p->ok == 0) { fprintf(stderr, "%s: no connection worked\n", p->name); return 1; }
    p->ok = p->errors = 0;
    p->spent = 0;
  }
  for (int done = 0; done < n; done += block) {
    int k = n - done < block ? n - done : block;
    for (int i = 0; i < count; i++)
      if (mode == 'i' ? pingpong_turn(&paths[i], k) : connect_turn(&paths[i], k)) return 1;
  }
  printf("{\"paths\": [");
  for (int i = 0; i < count; i++) {
    struct path *p = &paths[i];
    char head[128] = "";
    if (mode == 'c')
      snprintf(head, sizeof head, "\"conns_per_s\": %.1f, \"seconds\": %.3f, ",
               p->spent ? p->ok / (p->spent / 1e9) : 0.0, p->spent / 1e9);
    if (i) printf(", ");
    report(head, p->d, p->ok, p->errors);
  }
  printf("]}\n");
  return 0;
}
int main(int argc, char **argv) {
  raise_nofile();
  if (argc == 3 && argv[1][0] == 's') return serve(atoi(argv[2]));
  if (argc >= 7 && (argc - 4) % 3 == 0 && (argv[1][0] == 'i' || argv[1][0] == 'c')) {
    int n = atoi(argv[2]), block = atoi(argv[3]);
    if (n < 1 || block < 1) { fprintf(stderr, "N and BLOCK must be positive\n"); return 2; }
    return interleaved(argv[1][0], n, block, (argc - 4) / 3, argv + 4);
  }
  if (argc != 5) {
    fprintf(stderr, "usage: netbench s PORT | h HOST PORT N | i|c N BLOCK (NETNS HOST PORT)...\n");
    return 2;
  }
  const char *host = argv[2];
  int port = atoi(argv[3]), n = atoi(argv[4]);
  if (argv[1][0] == 'h') {
    int *socks = malloc(sizeof(int) * (size_t)n);
    for (int i = 0; i < n; i++) {
      socks[i] = dial(host, port);
      if (socks[i] < 0 || echo1(socks[i]) != 0) {
        fprintf(stderr, "connection %d failed: %s\n", i, strerror(errno));
        return 1;
      }
    }
    printf("ready %d\n", n);
    fflush(stdout);
    char line[16];
    if (read(0, line, sizeof line) < 0) return 1;
    for (int i = 0; i < n; i++) close(socks[i]);
    return 0;
  }
  fprintf(stderr, "unknown mode %s\n", argv[1]);
  return 2;
}
