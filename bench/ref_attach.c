/* The C reference of bench/attach_latency.py: the attach+detach cycle loopctl makes, with
 * nothing but the syscalls it needs.
 *
 *     ref_attach IMAGE ITERATIONS
 *
 * Each cycle opens /dev/loop-control, takes a free device (LOOP_CTL_GET_FREE), opens it and the
 * image, binds them (LOOP_CONFIGURE), closes the image, unbinds (LOOP_CLR_FD) and closes the
 * device and the control fd. Prints the mean microseconds per cycle (CLOCK_MONOTONIC), nothing
 * else on stdout.
 *
 * No retries and no locking: any failure ends the run with a message, exit status 3 for a lost
 * race (another process bound or removed the free device first: EBUSY, ENXIO, ENODEV), 1 for
 * anything else. A device whose LOOP_CONFIGURE failed is left alone, since EBUSY there means it
 * is someone else's binding. SIGINT, SIGTERM and SIGHUP (unless ignored when we start) stop the
 * run between two cycles, so an interrupted run never leaves a device bound.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define LOOP_CONTROL "/dev/loop-control"

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void die(const char *what, const char *path, const char *consequence)
{
    fprintf(stderr, "ref_attach: %s: %s: %s%s\n", path, what, strerror(errno), consequence);
    exit(1);
}

/* The device was taken or removed by another process between LOOP_CTL_GET_FREE and our call. */
static void die_if_lost_race(const char *what, const char *path)
{
    if (errno == EBUSY || errno == ENXIO || errno == ENODEV) {
        fprintf(stderr, "ref_attach: %s: %s: %s (lost the race for the free device)\n", path,
                what, strerror(errno));
        exit(3);
    }
}

/* Stop between two cycles on *sig*, unless it was ignored when we started (as in a background
 * job, whose SIGINT belongs to the shell). */
static int stop_on(int sig)
{
    struct sigaction old, sa = { .sa_handler = on_signal };
    if (sigaction(sig, NULL, &old))
        return -1;
    if (old.sa_handler == SIG_IGN)
        return 0;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: ref_attach IMAGE ITERATIONS\n");
        return 2;
    }
    const char *image = argv[1];
    char *end;
    errno = 0;
    long iterations = strtol(argv[2], &end, 10);
    if (errno || *end || end == argv[2] || iterations <= 0) {
        fprintf(stderr, "ref_attach: ITERATIONS must be a positive integer, not '%s'\n", argv[2]);
        return 2;
    }
    /* lo_file_name as loopctl stores it: the path, cut to LO_NAME_SIZE - 1 bytes. */
    size_t name_len = strlen(image);
    if (name_len > LO_NAME_SIZE - 1)
        name_len = LO_NAME_SIZE - 1;

    if (stop_on(SIGINT) || stop_on(SIGTERM) || stop_on(SIGHUP)) {
        perror("ref_attach: sigaction");
        return 1;
    }

    struct timespec start, done;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < iterations; i++) {
        if (stop) {
            fprintf(stderr, "ref_attach: interrupted after %ld cycles\n", i);
            return 1;
        }
        int ctl = open(LOOP_CONTROL, O_RDWR | O_CLOEXEC);
        if (ctl < 0)
            die("open", LOOP_CONTROL, "");
        int number = ioctl(ctl, LOOP_CTL_GET_FREE);
        if (number < 0)
            die("LOOP_CTL_GET_FREE", LOOP_CONTROL, "");
        char dev[32];
        snprintf(dev, sizeof dev, "/dev/loop%d", number);
        int dev_fd = open(dev, O_RDWR | O_CLOEXEC);
        if (dev_fd < 0) {
            die_if_lost_race("open", dev);
            die("open", dev, "");
        }
        int image_fd = open(image, O_RDWR | O_CLOEXEC);
        if (image_fd < 0)
            die("open", image, "");

        struct loop_config config;
        memset(&config, 0, sizeof config);
        config.fd = (__u32)image_fd;
        memcpy(config.info.lo_file_name, image, name_len);
        if (ioctl(dev_fd, LOOP_CONFIGURE, &config) < 0) {
            die_if_lost_race("LOOP_CONFIGURE", dev);
            die("LOOP_CONFIGURE", dev, " (not ours: left alone)");
        }
        close(image_fd);
        if (ioctl(dev_fd, LOOP_CLR_FD) < 0)
            die("LOOP_CLR_FD", dev, " (it stays bound)");
        close(dev_fd);
        close(ctl);
    }
    clock_gettime(CLOCK_MONOTONIC, &done);

    double elapsed_ns = (double)(done.tv_sec - start.tv_sec) * 1e9
                        + (double)(done.tv_nsec - start.tv_nsec);
    printf("%.3f\n", elapsed_ns / (double)iterations / 1e3);
    return 0;
}
