"""The seccomp profile containers get by default: docker's default profile, in spirit.

Written for layerfs after docker's (moby ``profiles/seccomp/default.json``): every system call
is refused with EPERM unless allowed here.  The allow-list is what ordinary programs use; left
out are the calls that reach into the kernel or the host beyond a container (keyrings, mounts,
modules, kexec, reboot, swap, clocks, accounting, quotas, the kernel log, BPF, perf events,
new namespaces, handles to files by number, io_uring, userfaultfd, ...).  As in docker's, some
of those come back with the capability that governs them (``--cap-add SYS_ADMIN`` allows
``mount``, ``unshare``, ``setns``, ...), ``clone`` may not make namespaces (its flags are
checked) and ``clone3``, whose flags cannot be, answers ENOSYS so that the C library falls
back to ``clone``; ``personality`` takes only the usual personas.

``linux_seccomp(caps)`` renders the table as the runtime spec's ``linux.seccomp`` for this
machine; runc installs it (names this kernel's libseccomp does not know are skipped).
"""

from __future__ import annotations

import errno
import os
from typing import Any

# Allowed to everyone (docker's big first rule).
ALLOWED = """
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chown32
clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64
clock_nanosleep clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2
dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait
epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64
fadvise64_64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchown32 fchownat
fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstat64
fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex futex_requeue futex_time64
futex_wait futex_waitv futex_wake futimesat getcpu getcwd getdents getdents64 getegid getegid32
geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32 getrlimit
get_robust_list getrusage getsid getsockname getsockopt get_thread_area gettid gettimeofday
getuid getuid32 getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel
ioctl io_destroy io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup
io_submit ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown
lchown32 lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr
lstat lstat64 madvise map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat
mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open
mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl
msgget msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat _newselect open openat
openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll
ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6
pselect6_time64 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recv recvfrom
recvmmsg recvmmsg_time64 recvmsg remap_file_pages removexattr rename renameat renameat2
restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo
sched_getaffinity sched_getattr sched_getparam sched_get_priority_max sched_get_priority_min
sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity
sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop
semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid
setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid
setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32
setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask sigreturn
socketcall socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync
sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun
timer_gettime timer_gettime64 timer_settime timer_settime64 timerfd_create timerfd_gettime
timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate truncate64 ugetrlimit
umask uname unlink unlinkat utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid
waitpid write writev
""".split()

# The namespace flags clone may not be given without CAP_SYS_ADMIN: CLONE_NEWNS | NEWCGROUP |
# NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (and CLONE_NEWTIME, 0x80, is in the low byte,
# where clone takes the exit signal: time namespaces need CAP_SYS_ADMIN anyway).
CLONE_NAMESPACE_FLAGS = 0x7E020000
# personality(2) values allowed: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and
# 0xffffffff (which only asks for the current one)
PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

ALLOW = "SCMP_ACT_ALLOW"
ERRNO = "SCMP_ACT_ERRNO"

# Rules after the allow-list: "caps" (allowed only with one of them), "unless_caps" (only
# without all of them), "min_kernel", "arches" (docker's architecture names of this machine).
RULES: list[dict[str, Any]] = [
    {"names": ["process_vm_readv", "process_vm_writev", "ptrace"], "min_kernel": (4, 8)},
    # AF_VSOCK (40) reaches the hypervisor host: refused, as docker does
    {"names": ["socket"], "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]},
    *({"names": ["personality"], "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}]} for p in PERSONAS),
    {"names": ["arch_prctl", "modify_ldt"], "arches": ["amd64", "386"]},
    {
        "names": [
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "breakpoint",
            "cacheflush",
            "set_tls",
        ],
        "arches": ["arm", "arm64"],
    },
    {"names": ["riscv_flush_icache"], "arches": ["riscv64"]},
    {"names": ["s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"], "arches": ["s390x"]},
    {
        "names": ["clone"],
        "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        "unless_caps": ["CAP_SYS_ADMIN"],
        "not_arches": ["s390x"],
    },
    {  # s390 swaps clone's first two arguments
        "names": ["clone"],
        "args": [{"index": 1, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        "unless_caps": ["CAP_SYS_ADMIN"],
        "arches": ["s390x"],
    },
    {"names": ["clone3"], "action": ERRNO, "errno": errno.ENOSYS, "unless_caps": ["CAP_SYS_ADMIN"]},
    {
        "names": [
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
        "caps": ["CAP_SYS_ADMIN"],
    },
    {"names": ["reboot"], "caps": ["CAP_SYS_BOOT"]},
    {"names": ["chroot"], "caps": ["CAP_SYS_CHROOT"]},
    {"names": ["delete_module", "init_module", "finit_module"], "caps": ["CAP_SYS_MODULE"]},
    {"names": ["acct"], "caps": ["CAP_SYS_PACCT"]},
    {
        "names": [
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
        "caps": ["CAP_SYS_PTRACE"],
    },
    {"names": ["iopl", "ioperm"], "caps": ["CAP_SYS_RAWIO"]},
    {"names": ["settimeofday", "stime", "clock_settime", "clock_settime64"], "caps": ["CAP_SYS_TIME"]},
    {"names": ["vhangup"], "caps": ["CAP_SYS_TTY_CONFIG"]},
    {
        "names": ["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"],
        "caps": ["CAP_SYS_NICE"],
    },
    {"names": ["syslog"], "caps": ["CAP_SYSLOG"]},
    {"names": ["bpf"], "caps": ["CAP_BPF"]},
    {"names": ["perf_event_open"], "caps": ["CAP_PERFMON"]},
    {"names": ["open_by_handle_at"], "caps": ["CAP_DAC_READ_SEARCH"]},
]

# libseccomp's names of the architectures a machine's programs may use
_SCMP_ARCHES = {
    "amd64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "386": ["SCMP_ARCH_X86"],
    "arm64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
    "arm": ["SCMP_ARCH_ARM"],
    "ppc64le": ["SCMP_ARCH_PPC64LE"],
    "s390x": ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
    "riscv64": ["SCMP_ARCH_RISCV64"],
}
_MACHINE = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "i686": "386",
    "i386": "386",
    "armv7l": "arm",
    "armv6l": "arm",
}


def _kernel() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def linux_seccomp(caps: list[str], machine: str | None = None) -> dict[str, Any]:
    """The runtime spec's ``linux.seccomp`` for a container with these capabilities."""
    arch = _MACHINE.get(machine or os.uname().machine, machine or os.uname().machine)
    have = set(caps)
    kernel = _kernel()
    syscalls: list[dict[str, Any]] = [{"names": list(ALLOWED), "action": ALLOW}]
    for rule in RULES:
        if "caps" in rule and not have & set(rule["caps"]):
            continue
        if "unless_caps" in rule and set(rule["unless_caps"]) <= have:
            continue
        if "min_kernel" in rule and kernel < rule["min_kernel"]:
            continue
        if "arches" in rule and arch not in rule["arches"]:
            continue
        if "not_arches" in rule and arch in rule["not_arches"]:
            continue
        entry: dict[str, Any] = {"names": list(rule["names"]), "action": rule.get("action", ALLOW)}
        if "errno" in rule:
            entry["errnoRet"] = rule["errno"]
        if "args" in rule:
            entry["args"] = [dict(a) for a in rule["args"]]
        syscalls.append(entry)
    out: dict[str, Any] = {"defaultAction": ERRNO, "defaultErrnoRet": errno.EPERM, "syscalls": syscalls}
    if arch in _SCMP_ARCHES:
        out["architectures"] = list(_SCMP_ARCHES[arch])
    return out
