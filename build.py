"""cffi (API mode) builders for the kernel interfaces flexblock talks to: loopctl._ffi (loop
devices, block ioctls, OFD locks), nbd._ffi (the nbd generic-netlink family) and
flexvolume._ffi (mount(2), umount2(2), prctl(2)).

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
    int fb_write_back(int fd);
    """
)

loop_ffi.set_source(
    "loopctl._ffi",
    """
    #define _GNU_SOURCE
    #include <errno.h>
    #include <fcntl.h>
    #include <sys/ioctl.h>
    #include <linux/fs.h>
    #include <linux/loop.h>

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

    /* Write back every dirty page of the file (here: a block device's cache) and wait for
       it, without asking the storage below for a cache flush as fsync would. */
    static int fb_write_back(int fd)
    {
        unsigned int how = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                           SYNC_FILE_RANGE_WAIT_AFTER;
        return sync_file_range(fd, 0, 0, how) < 0 ? -errno : 0;
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
    """
)

nbd_ffi.set_source(
    "nbd._ffi",
    """
    #include <sys/socket.h>
    #include <linux/netlink.h>
    #include <linux/genetlink.h>
    #include <linux/nbd.h>
    #include <linux/nbd-netlink.h>

    static const char *const NBD_FAMILY = NBD_GENL_FAMILY_NAME;
    static const char *const NBD_MCAST_GROUP = NBD_GENL_MCAST_GROUP_NAME;
    """,
)
