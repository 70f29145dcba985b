"""The worker protocol's numbers: versions and what each adds, feature names, opcodes
(Nix's and storekeeper's own), the log channel's codes (spec §2, §4)."""

from __future__ import annotations

import enum

# --- constants (spec §2) ------------------------------------------------------

WORKER_MAGIC_1 = 0x6E697863  # client -> daemon, "cxin"
WORKER_MAGIC_2 = 0x6478696F  # daemon -> client, "oixd"
PROTOCOL_VERSION = 0x126  # 1.38: Nix 2.24 .. 2.35 (with feature sets)
#: the version Nix 2.8.0 .. 2.14 speak (and the newest without a trust flag)
PROTOCOL_1_34 = 0x122

# The first minor version of each change after 1.34 (protocol-1.35-plus.md §3).
# Every test is made on the *negotiated* version, min(ours, theirs).
TRUST_MINOR = 35          # the daemon ends the handshake with a trust flag
ADD_PERM_ROOT_MINOR = 36  # op 47 AddPermRoot
CPU_TIMES_MINOR = 37      # BuildResult carries cpuUser, cpuSystem
FEATURES_MINOR = 38       # feature sets exchanged in the handshake

#: the feature names of 1.38 (2.35) that change the wire
FEATURE_DELETE_DEAD_SPECIFIC = "delete-dead-specific-referrers"
FEATURE_REALISATION_PATH = "realisation-with-path-not-hash"
FEATURE_DISABLE_SET_OPTIONS = "disable-set-options"
#: the features storekeeper implements (offered by its daemon and its client)
SUPPORTED_FEATURES = frozenset({FEATURE_DELETE_DEAD_SPECIFIC})
#: feature lists longer than this (or names longer than MAX_FEATURE_LEN) are refused
MAX_FEATURES = 1024
MAX_FEATURE_LEN = 1024


class Trust(enum.IntEnum):
    """The 1.35 trust flag."""

    UNKNOWN = 0
    TRUSTED = 1
    NOT_TRUSTED = 2
EXPORT_MAGIC = 0x4558494E  # "NIXE": follows the NAR in the export format


def protocol_major(version: int) -> int:
    return version & 0xFF00


def protocol_minor(version: int) -> int:
    return version & 0x00FF


def format_version(version: int) -> str:
    return f"{protocol_major(version) >> 8}.{protocol_minor(version)}"


class Stderr(enum.IntEnum):
    """Codes of the daemon's log ("stderr") channel."""

    NEXT = 0x6F6C6D67
    READ = 0x64617461
    WRITE = 0x64617416
    LAST = 0x616C7473
    ERROR = 0x63787470
    START_ACTIVITY = 0x53545254
    STOP_ACTIVITY = 0x53544F50
    RESULT = 0x52534C54


class Op(enum.IntEnum):
    """Worker operations (opcodes) of protocol 1.38."""

    IsValidPath = 1
    HasSubstitutes = 3
    QueryPathHash = 4
    QueryReferences = 5
    QueryReferrers = 6
    AddToStore = 7
    AddTextToStore = 8
    BuildPaths = 9
    EnsurePath = 10
    AddTempRoot = 11
    AddIndirectRoot = 12
    SyncWithGC = 13
    FindRoots = 14
    ExportPath = 16
    QueryDeriver = 18
    SetOptions = 19
    CollectGarbage = 20
    QuerySubstitutablePathInfo = 21
    QueryDerivationOutputs = 22
    QueryAllValidPaths = 23
    QueryPathInfo = 26
    ImportPaths = 27
    QueryDerivationOutputNames = 28
    QueryPathFromHashPart = 29
    QuerySubstitutablePathInfos = 30
    QueryValidPaths = 31
    QuerySubstitutablePaths = 32
    QueryValidDerivers = 33
    OptimiseStore = 34
    VerifyStore = 35
    BuildDerivation = 36
    AddSignatures = 37
    NarFromPath = 38
    AddToStoreNar = 39
    QueryMissing = 40
    QueryDerivationOutputMap = 41
    RegisterDrvOutput = 42
    QueryRealisation = 43
    AddMultipleToStore = 44
    AddBuildLog = 45
    BuildPathsWithResults = 46
    AddPermRoot = 47  # 1.36


class ExtOp(enum.IntEnum):
    """storekeeper's own operations (per-user roots, TCP keys, read-only inspection), far
    from Nix's numbers.

    Only storekeeper's client sends them; the real nix-daemon answers an
    unknown opcode with ``STDERR_ERROR "invalid operation N"`` and closes.

    * 1000 RegisterRoots.  C: u64 n, n × (string name, string path).
      R: strings (names refused: path not valid).
    * 1001 UnregisterRoots.  C: strings names.  R: strings (names removed).
    * 1002 ReportRuntimeRoots.  C: string lease name, strings paths.
      R: u64 lease seconds (0: the daemon does not hold client reports), u64 held.
    * 1003 ListRoots.  C: —.  R: string (JSON: settings and roots).
    * 1100 IssueTcpKey.  C: —.  R: string user, u64 uid, string key (32 bytes).
    * 1101 RevokeTcpKey.  C: —.  R: u64 1 if a key was revoked, else 0.
    * 1200 StoreStats.  C: —.  R: string (JSON: the ``.links`` pool's figures).
    * 1201 GCDryRun.  C: —.  R: strings (dead paths), u64 bytes freed on disk,
      u64 apparent bytes (what a GC would delete now; read-only).
    * 1202 WhyAlive.  C: string path.  R: u64 n, n × (string label, string path): the
      shortest chain from a root (first: root label, root path; then edge kind, path);
      n = 0: no root reaches the path.
    * 1203 SpaceReport.  C: u64 nar (1: NAR sizes from the DB, 0: disk bytes), u64 top.
      R: string (JSON: ``du``'s report, its holder masks and root bits).
    """

    RegisterRoots = 1000
    UnregisterRoots = 1001
    ReportRuntimeRoots = 1002
    ListRoots = 1003
    IssueTcpKey = 1100
    RevokeTcpKey = 1101
    StoreStats = 1200
    GCDryRun = 1201
    WhyAlive = 1202
    SpaceReport = 1203


class Verbosity(enum.IntEnum):
    ERROR = 0
    WARN = 1
    NOTICE = 2
    INFO = 3
    TALKATIVE = 4
    CHATTY = 5
    DEBUG = 6
    VOMIT = 7


class ActivityType(enum.IntEnum):
    UNKNOWN = 0
    COPY_PATH = 100
    FILE_TRANSFER = 101
    REALISE = 102
    COPY_PATHS = 103
    BUILDS = 104
    BUILD = 105
    OPTIMISE_STORE = 106
    VERIFY_PATHS = 107
    SUBSTITUTE = 108
    QUERY_PATH_INFO = 109
    POST_BUILD_HOOK = 110
    BUILD_WAITING = 111


class ResultType(enum.IntEnum):
    FILE_LINKED = 100
    BUILD_LOG_LINE = 101
    UNTRUSTED_PATH = 102
    CORRUPTED_PATH = 103
    SET_PHASE = 104
    PROGRESS = 105
    SET_EXPECTED = 106
    POST_BUILD_LOG_LINE = 107


FIELD_INT = 0
FIELD_STRING = 1

#: the first minor version whose STDERR_ERROR carries the structured Error record
ERROR_RECORD_MINOR = 26
