"""cffi (API mode) builders for the kernel interfaces flexblock talks to: loopctl._ffi (loop
devices, block ioctls, OFD locks, and loopctl's attach and detach sequences in C, whose
syscalls would each cost more in the interpreter than in the kernel), nbd._ffi (the nbd
generic-netlink family) and flexvolume._ffi (mount(2), umount2(2), prctl(2)).

Everything here is compiled against the installed headers, so ioctl numbers, flag values and
struct layouts come from <linux/loop.h>, <linux/fs.h>, <fcntl.h>, <linux/nbd.h>,
<linux/nbd-netlink.h>, <linux/genetlink.h> and <sys/mount.h> themselves;
the cdefs only name what we use and let the compiler fill in values and offsets (`...`).

The C helpers return -errno on failure so that Python never has to read a thread-global errno
after a call, and each releases the GIL like any cffi call.
"""

from cffi import FFI

loop_ffi = FFI()

loop_ffi.cdef(
    """
    #define LO_NAME_SIZE ...
    enum {
        LO_FLAGS_READ_ONLY = ...,
        LO_FLAGS_AUTOCLEAR = ...,
        LO_FLAGS_PARTSCAN = ...,
        LO_FLAGS_DIRECT_IO = ...,
    };
    #define LOOP_SET_STATUS_SETTABLE_FLAGS ...
    #define LOOP_CONFIGURE_SETTABLE_FLAGS ...

    #define LOOP_SET_FD ...
    #define LOOP_CLR_FD ...
    #define LOOP_SET_STATUS64 ...
    #define LOOP_GET_STATUS64 ...
    #define LOOP_SET_CAPACITY ...
    #define LOOP_SET_DIRECT_IO ...
    #define LOOP_SET_BLOCK_SIZE ...
    #define LOOP_CONFIGURE ...
    #define LOOP_CTL_ADD ...
    #define LOOP_CTL_REMOVE ...
    #define LOOP_CTL_GET_FREE ...

    #define BLKGETSIZE64 ...
    #define BLKSSZGET ...
    #define BLKFLSBUF ...
    #define BLKGETDISKSEQ ...
    #define LOOP_MAJOR ...

    struct loop_info64 {
        uint64_t lo_device;
        uint64_t lo_inode;
        uint64_t lo_rdevice;
        uint64_t lo_offset;
        uint64_t lo_sizelimit;
        uint32_t lo_number;
        uint32_t lo_flags;
        uint8_t  lo_file_name[...];
        ...;
    };
    struct loop_config {
        uint32_t fd;
        uint32_t block_size;
        struct loop_info64 info;
        ...;
    };

    #define F_OFD_GETLK ...
    #define F_OFD_SETLK ...
    #define F_RDLCK ...
    #define F_WRLCK ...
    #define F_UNLCK ...
    struct flock {
        short l_type;
        short l_whence;
        int64_t l_start;
        int64_t l_len;
        int l_pid;
        ...;
    };

    int fb_ioctl_ptr(int fd, unsigned long request, void *arg);
    int fb_ioctl_int(int fd, unsigned long request, unsigned long arg);
    int fb_fcntl_lock(int fd, int cmd, struct flock *lock);

    static const char *const FB_LOOP_CONTROL;
    enum {
        FB_OPEN_CONTROL = ..., FB_LOCK_CONTROL = ..., FB_GET_FREE = ..., FB_OPEN = ...,
        FB_CONFIGURE = ..., FB_RELEASE_CONTROL = ..., FB_GET_STATUS = ..., FB_GET_SIZE = ...,
        FB_GET_DISKSEQ = ..., FB_VERIFY = ..., FB_DONE = ...,
    };
    struct fb_attach {
        int control_fd;
        char node_prefix[32];
        int node_flags;
        unsigned int part_shift;
        struct loop_config config;
        uint64_t backing_size;
        int step;
        int number;
        int dev_fd;
        struct loop_info64 status;
        uint64_t size;
        uint64_t diskseq;
    };
    int fb_attach_start(struct fb_attach *a, const char *node_prefix, int node_flags,
                        unsigned int part_shift, int backing_fd, uint64_t backing_size,
                        unsigned int block_size, uint64_t offset, uint64_t sizelimit,
                        unsigned int flags, const char *file_name, size_t file_name_len,
                        int until);
    int fb_attach(struct fb_attach *a, int until);
    uint64_t fb_expected_size(uint64_t backing_size, uint64_t offset, uint64_t sizelimit);
    int64_t fb_backing_size(int fd);

    enum { FB_WRITE_BACK = ..., FB_FSYNC = ..., FB_CLR_FD = ... };
    int fb_detach(int fd, int durable);
    """
)

loop_ffi.set_source(
    "loopctl._ffi",
    """
    #define _GNU_SOURCE
    #include <errno.h>
    #include <fcntl.h>
    #include <string.h>
    #include <stdint.h>
    #include <unistd.h>
    #include <sys/file.h>
    #include <sys/ioctl.h>
    #include <sys/stat.h>
    #include <sys/sysmacros.h>
    #include <linux/fs.h>
    #include <linux/loop.h>
    #include <linux/major.h>

    static int fb_ioctl_ptr(int fd, unsigned long request, void *arg)
    {
        int r = ioctl(fd, request, arg);
        return r < 0 ? -errno : r;
    }

    static int fb_ioctl_int(int fd, unsigned long request, unsigned long arg)
    {
        int r = ioctl(fd, request, arg);
        return r < 0 ? -errno : r;
    }

    static int fb_fcntl_lock(int fd, int cmd, struct flock *lock)
    {
        int r = fcntl(fd, cmd, lock);
        return r < 0 ? -errno : r;
    }

    /* The hot path of loopctl.attach() in one call, from opening /dev/loop-control to checking
       the new binding; loopctl/device.py keeps the policy (retries, fallbacks, and the full
       verification when the check here finds anything amiss).

       Runs the steps from a->step up to, not including, until, and returns 0, or -errno
       with a->step left at the step that failed, so that the caller can do that step its own
       way and resume at the next. a->control_fd is -1 before FB_OPEN_CONTROL and after
       FB_RELEASE_CONTROL, and a->dev_fd is -1 before FB_OPEN; in between they are open, also
       when a later step failed (the caller closes them). FB_GET_STATUS to FB_DONE alone read
       back any bound device. */
    #define FB_LOOP_CONTROL_PATH "/dev/loop-control"
    static const char *const FB_LOOP_CONTROL = FB_LOOP_CONTROL_PATH;
    enum {
        FB_OPEN_CONTROL, FB_LOCK_CONTROL, FB_GET_FREE, FB_OPEN, FB_CONFIGURE, FB_RELEASE_CONTROL,
        FB_GET_STATUS, FB_GET_SIZE, FB_GET_DISKSEQ, FB_VERIFY, FB_DONE,
    };
    struct fb_attach {
        int control_fd;             /* /dev/loop-control */
        char node_prefix[32];       /* "/dev/loop": the node's path is this and the number */
        int node_flags;             /* open(2) flags for the node */
        unsigned int part_shift;    /* the device's minor is its number << part_shift */
        struct loop_config config;  /* for LOOP_CONFIGURE */
        uint64_t backing_size;      /* for FB_VERIFY: the backing file's size when opened */
        int step;
        int number;                 /* out of FB_GET_FREE */
        int dev_fd;                 /* out of FB_OPEN */
        struct loop_info64 status;  /* out of FB_GET_STATUS */
        uint64_t size;              /* out of FB_GET_SIZE */
        uint64_t diskseq;           /* out of FB_GET_DISKSEQ */
    };

    /* The kernel's get_size(): what follows the offset, capped by sizelimit, in whole sectors. */
    static uint64_t fb_expected_size(uint64_t backing_size, uint64_t offset, uint64_t sizelimit)
    {
        uint64_t available = backing_size > offset ? backing_size - offset : 0;
        if (sizelimit > 0 && sizelimit < available)
            available = sizelimit;
        return available & ~(uint64_t)511;
    }

    /* The size of a regular file or block device, or -1 for anything else or a failed call:
       the caller then asks again its own way and reports why. */
    static int64_t fb_backing_size(int fd)
    {
        struct stat st;
        uint64_t size;
        if (fstat(fd, &st) < 0)
            return -1;
        if (S_ISREG(st.st_mode))
            return st.st_size;
        if (S_ISBLK(st.st_mode) && ioctl(fd, BLKGETSIZE64, &size) == 0 && size <= INT64_MAX)
            return (int64_t)size;
        return -1;
    }

    /* A sequence to run from FB_OPEN_CONTROL. */
    static void fb_attach_init(struct fb_attach *a, const char *node_prefix, int node_flags,
                               unsigned int part_shift, int backing_fd, uint64_t backing_size,
                               unsigned int block_size, uint64_t offset, uint64_t sizelimit,
                               unsigned int flags, const char *file_name, size_t file_name_len)
    {
        memset(a, 0, sizeof *a);
        a->control_fd = -1;
        strncpy(a->node_prefix, node_prefix, sizeof a->node_prefix - 1);
        a->node_flags = node_flags;
        a->part_shift = part_shift;
        a->config.fd = (uint32_t)backing_fd;
        a->config.block_size = block_size;
        a->config.info.lo_offset = offset;
        a->config.info.lo_sizelimit = sizelimit;
        a->config.info.lo_flags = flags;
        /* The kernel forces the terminating NUL itself; we keep it inside anyway. */
        if (file_name_len > LO_NAME_SIZE - 1)
            file_name_len = LO_NAME_SIZE - 1;
        memcpy(a->config.info.lo_file_name, file_name, file_name_len);
        a->backing_size = backing_size;
        a->step = FB_OPEN_CONTROL;
        a->dev_fd = -1;
    }

    static int fb_open_node(struct fb_attach *a)
    {
        char path[sizeof a->node_prefix + 12], digits[12];
        struct stat st;
        /* The prefix, then the number: snprintf's format parsing would cost more. */
        size_t len = strlen(a->node_prefix), n = 0;
        unsigned int number = (unsigned int)a->number;
        do
            digits[n++] = (char)('0' + number % 10);
        while (number /= 10);
        memcpy(path, a->node_prefix, len);
        while (n)
            path[len++] = digits[--n];
        path[len] = 0;
        int fd = open(path, a->node_flags);
        if (fd < 0)
            return -errno;
        /* A static /dev can hold a node named loopN that is another device: _devnode.open_node
           checks the same, and the caller hands it this step when it fails here. */
        if (fstat(fd, &st) < 0 || !S_ISBLK(st.st_mode) ||
            st.st_rdev != makedev(LOOP_MAJOR, (unsigned int)a->number << a->part_shift)) {
            close(fd);
            return -ENODEV;
        }
        a->dev_fd = fd;
        return 0;
    }

    /* Did the kernel apply what was asked (systemd's loop_configure_verify)? -ERANGE if not:
       the caller then looks again itself, mends what it can and says what is wrong. */
    static int fb_verify(struct fb_attach *a)
    {
        const struct loop_info64 *asked = &a->config.info;
        int sector;
        if (a->status.lo_offset != asked->lo_offset ||
            a->status.lo_sizelimit != asked->lo_sizelimit ||
            /* Vanilla 5.8 ignored PARTSCAN in LOOP_CONFIGURE. */
            (asked->lo_flags & LO_FLAGS_PARTSCAN && !(a->status.lo_flags & LO_FLAGS_PARTSCAN)) ||
            a->size != fb_expected_size(a->backing_size, asked->lo_offset, asked->lo_sizelimit))
            return -ERANGE;
        if (a->config.block_size) {
            if (ioctl(a->dev_fd, BLKSSZGET, &sector) < 0)
                return -errno;
            if ((unsigned int)sector != a->config.block_size)
                return -ERANGE;
        }
        return 0;
    }

    static int fb_attach_step(struct fb_attach *a)
    {
        int r;
        switch (a->step) {
        case FB_OPEN_CONTROL:
            r = open(FB_LOOP_CONTROL_PATH, O_RDWR | O_CLOEXEC);
            if (r >= 0)
                a->control_fd = r;
            break;
        case FB_LOCK_CONTROL:
            /* Our own allocators queue here from LOOP_CTL_GET_FREE until their device is
               bound (lock order: control, then device). */
            r = flock(a->control_fd, LOCK_EX);
            break;
        case FB_GET_FREE:
            r = ioctl(a->control_fd, LOOP_CTL_GET_FREE);
            if (r >= 0)
                a->number = r;
            break;
        case FB_OPEN:
            return fb_open_node(a);
        case FB_CONFIGURE:
            r = ioctl(a->dev_fd, LOOP_CONFIGURE, &a->config);
            break;
        case FB_RELEASE_CONTROL:
            /* The device is bound: let the next allocator in. */
            if (a->control_fd >= 0)
                close(a->control_fd);
            a->control_fd = -1;
            return 0;
        case FB_GET_STATUS:
            r = ioctl(a->dev_fd, LOOP_GET_STATUS64, &a->status);
            break;
        case FB_GET_SIZE:
            r = ioctl(a->dev_fd, BLKGETSIZE64, &a->size);
            break;
        case FB_GET_DISKSEQ:
            r = ioctl(a->dev_fd, BLKGETDISKSEQ, &a->diskseq);
            /* Before 5.15 there is no diskseq: ENOTTY, reported as 0. */
            if (r < 0 && errno == ENOTTY) {
                a->diskseq = 0;
                r = 0;
            }
            break;
        case FB_VERIFY:
            return fb_verify(a);
        default:
            return -EINVAL;
        }
        return r < 0 ? -errno : 0;
    }

    static int fb_attach(struct fb_attach *a, int until)
    {
        for (; a->step < until; a->step++) {
            int r = fb_attach_step(a);
            if (r < 0)
                return r;
        }
        return 0;
    }

    /* fb_attach_init and fb_attach in one call, where Python would make a dozen stores. */
    static int fb_attach_start(struct fb_attach *a, const char *node_prefix, int node_flags,
                               unsigned int part_shift, int backing_fd, uint64_t backing_size,
                               unsigned int block_size, uint64_t offset, uint64_t sizelimit,
                               unsigned int flags, const char *file_name, size_t file_name_len,
                               int until)
    {
        fb_attach_init(a, node_prefix, node_flags, part_shift, backing_fd, backing_size,
                       block_size, offset, sizelimit, flags, file_name, file_name_len);
        return fb_attach(a, until);
    }

    /* LoopDevice.detach(): write the device's cache back into the backing file (durable: and
       make the file durable), then LOOP_CLR_FD, and close fd. Returns 0, or -(errno | step <<
       16) naming the step that failed, fd still open. sync_file_range writes dirty pages back
       and waits for them without asking the storage below for a cache flush, as fsync would.
       */
    /* Numbered after fb_attach's steps, so that one table names them all. */
    enum { FB_WRITE_BACK = FB_DONE + 1, FB_FSYNC, FB_CLR_FD };

    static int fb_detach(int fd, int durable)
    {
        unsigned int how = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                           SYNC_FILE_RANGE_WAIT_AFTER;
        if (durable ? fsync(fd) < 0 : sync_file_range(fd, 0, 0, how) < 0)
            return -(errno | (durable ? FB_FSYNC : FB_WRITE_BACK) << 16);
        if (ioctl(fd, LOOP_CLR_FD, 0) < 0)
            return -(errno | FB_CLR_FD << 16);
        close(fd);
        return 0;
    }
    """,
)

mount_ffi = FFI()

mount_ffi.cdef(
    """
    #define MS_RDONLY ...
    #define MS_NOSUID ...
    #define MS_NODEV ...
    #define MS_NOEXEC ...
    #define MS_SYNCHRONOUS ...
    #define MS_DIRSYNC ...
    #define MS_NOATIME ...
    #define MS_NODIRATIME ...
    #define MS_RELATIME ...
    #define MS_STRICTATIME ...
    #define MS_LAZYTIME ...
    #define MS_SILENT ...
    #define UMOUNT_NOFOLLOW ...

    int fb_mount(const char *source, const char *target, const char *fstype,
                 unsigned long flags, const char *data);
    int fb_umount(const char *target, int flags);
    int fb_die_with_parent(int parent);
    int fb_syncfs(int fd);
    """
)

mount_ffi.set_source(
    "flexvolume._ffi",
    """
    #define _GNU_SOURCE  /* syncfs */
    #include <errno.h>
    #include <signal.h>
    #include <unistd.h>
    #include <sys/mount.h>
    #include <sys/prctl.h>

    static int fb_mount(const char *source, const char *target, const char *fstype,
                        unsigned long flags, const char *data)
    {
        return mount(source, target, fstype, flags, data) < 0 ? -errno : 0;
    }

    static int fb_umount(const char *target, int flags)
    {
        return umount2(target, flags) < 0 ? -errno : 0;
    }

    static int fb_syncfs(int fd)
    {
        return syncfs(fd) < 0 ? -errno : 0;
    }

    /* In a child between fork and exec: be killed when the parent dies, and if it already
       has (we were reparented before prctl took effect), go now. */
    static int fb_die_with_parent(int parent)
    {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
            return -errno;
        if (getppid() != parent)
            _exit(1);
        return 0;
    }
    """,
)


nbd_ffi = FFI()

nbd_ffi.cdef(
    """
    #define NBD_FLAG_HAS_FLAGS ...
    #define NBD_FLAG_READ_ONLY ...
    #define NBD_FLAG_SEND_FLUSH ...
    #define NBD_FLAG_SEND_FUA ...
    #define NBD_FLAG_SEND_TRIM ...
    #define NBD_FLAG_CAN_MULTI_CONN ...
    #define NBD_CFLAG_DESTROY_ON_DISCONNECT ...
    #define NBD_CFLAG_DISCONNECT_ON_CLOSE ...

    #define NBD_GENL_VERSION ...
    static const char *const NBD_FAMILY;
    static const char *const NBD_MCAST_GROUP;
    enum {
        NBD_ATTR_INDEX = ..., NBD_ATTR_SIZE_BYTES = ..., NBD_ATTR_BLOCK_SIZE_BYTES = ...,
        NBD_ATTR_TIMEOUT = ..., NBD_ATTR_SERVER_FLAGS = ..., NBD_ATTR_CLIENT_FLAGS = ...,
        NBD_ATTR_SOCKETS = ..., NBD_ATTR_DEAD_CONN_TIMEOUT = ..., NBD_ATTR_DEVICE_LIST = ...,
        NBD_ATTR_BACKEND_IDENTIFIER = ...,
    };
    enum { NBD_SOCK_ITEM = ..., NBD_SOCK_FD = ... };
    enum { NBD_DEVICE_ITEM = ..., NBD_DEVICE_INDEX = ..., NBD_DEVICE_CONNECTED = ... };
    enum {
        NBD_CMD_CONNECT = ..., NBD_CMD_DISCONNECT = ..., NBD_CMD_RECONFIGURE = ...,
        NBD_CMD_LINK_DEAD = ..., NBD_CMD_STATUS = ...,
    };

    #define NETLINK_GENERIC ...
    #define SOL_NETLINK ...
    #define NETLINK_ADD_MEMBERSHIP ...
    #define NETLINK_EXT_ACK ...
    #define NETLINK_CAP_ACK ...
    #define NLM_F_REQUEST ...
    #define NLM_F_ACK ...
    #define NLM_F_ACK_TLVS ...
    #define NLMSG_ERROR ...
    #define NLMSG_DONE ...
    #define NLA_F_NESTED ...
    #define GENL_ID_CTRL ...
    enum { CTRL_CMD_GETFAMILY = ... };
    enum {
        CTRL_ATTR_FAMILY_ID = ..., CTRL_ATTR_FAMILY_NAME = ..., CTRL_ATTR_MCAST_GROUPS = ...,
    };
    enum { CTRL_ATTR_MCAST_GRP_NAME = ..., CTRL_ATTR_MCAST_GRP_ID = ... };
    enum { NLMSGERR_ATTR_MSG = ... };

    struct nlmsghdr { uint32_t nlmsg_len; uint16_t nlmsg_type; uint16_t nlmsg_flags;
                      uint32_t nlmsg_seq; uint32_t nlmsg_pid; ...; };
    struct genlmsghdr { uint8_t cmd; uint8_t version; ...; };
    struct nlattr { uint16_t nla_len; uint16_t nla_type; ...; };
    struct nlmsgerr { int error; struct nlmsghdr msg; ...; };

    int fb_pidfd_getfd(int pidfd, int targetfd);
    """
)

nbd_ffi.set_source(
    "nbd._ffi",
    """
    #include <errno.h>
    #include <sys/pidfd.h>
    #include <sys/socket.h>
    #include <linux/netlink.h>
    #include <linux/genetlink.h>
    #include <linux/nbd.h>
    #include <linux/nbd-netlink.h>

    static const char *const NBD_FAMILY = NBD_GENL_FAMILY_NAME;
    static const char *const NBD_MCAST_GROUP = NBD_GENL_MCAST_GROUP_NAME;

    /* A copy of another process's fd (same open file description), or -errno. */
    static int fb_pidfd_getfd(int pidfd, int targetfd)
    {
        int fd = pidfd_getfd(pidfd, targetfd, 0);
        return fd < 0 ? -errno : fd;
    }
    """,
)
