#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for the tests, from Debian's packages
# (ceph-mon ceph-mgr ceph-osd ceph-common, 16.2.x):
#
#   bash scripts/ceph.sh start DIR    one mon, one mgr, one OSD, pool `rbd` (size 1,
#                                     application rbd), cephx on, 127.0.0.1; writes
#                                     DIR/ceph.conf and DIR/keyring (client.admin)
#   bash scripts/ceph.sh stop DIR     stops what start started, by PID: OSD and mgr,
#                                     then the mon; removes nothing outside DIR
#
# Everything lives under DIR (the daemons' data, logs, admin sockets, keys, the
# bluestore block file); the daemons run in the foreground of their own PIDs (no
# systemd), recorded in DIR/run/*.pid.  The mon's ports are picked free, the OSD and mgr
# take free ones from Ceph's own range, so several clusters can run side by side.
# Every wait is bounded.  When the cluster cannot start, start stops whatever it had
# started, prints one line on stderr ("ceph.sh: ...") and exits non-zero (2: a
# requirement is missing, 1: a daemon failed; the logs stay in DIR/log).
#
# Environment:
#   CEPH_OBJECTSTORE   memstore (default: data in the OSD's RAM, nothing on disk) or
#                      bluestore (a sparse file DIR/osd.block)
#   CEPH_OSD_BYTES     the OSD's capacity (default 16 GiB: memstore's ceiling on RAM,
#                      bluestore's sparse file size)
#   CEPH_START_TIMEOUT seconds start may take in all (default 90)
set -euo pipefail
unset CEPH_ARGS CEPH_CONF

PROG=ceph.sh
die() { local code=$1; shift; echo "$PROG: $*" >&2; exit "$code"; }

usage() { die 2 "usage: ceph.sh start|stop DIR"; }
[ $# -eq 2 ] || usage
CMD=$1
DIR=$2
[ -n "$DIR" ] || usage
if [ "$CMD" = stop ] && [ ! -d "$DIR" ]; then exit 0; fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd -P)
RUN=$DIR/run
LOG=$DIR/log

# --------------------------------------------------------------------------- stop

# the PID recorded for NAME, if that process is still ours (its command line names
# the daemon and this cluster's conf: a recycled PID is never signalled)
our_pid() {
    local name=$1 pid cmdline
    [ -s "$RUN/$name.pid" ] || return 1
    pid=$(cat "$RUN/$name.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ $cmdline == *"$DIR/ceph.conf"* ]] || return 1
    echo "$pid"
}

# running PID: the process exists and is not a zombie (an orphaned daemon's exit is
# reaped by PID 1 when it gets to it, seconds later on some machines)
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# wait_gone TENTHS PID...: wait up to TENTHS tenths of a second until none is running
wait_gone() {
    local tenths=$1 i pid alive
    shift
    for i in $(seq 1 "$tenths"); do
        alive=0
        for pid in "$@"; do
            if running "$pid"; then alive=1; fi
        done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    return 0
}

# stop_daemons SIGNAL NAME...: signal them together, wait (bounded) until all are
# gone, then SIGKILL what is left
stop_daemons() {
    local sig=$1 name pid pids=()
    shift
    for name in "$@"; do
        if pid=$(our_pid "$name"); then
            kill "-$sig" "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    wait_gone 100 "${pids[@]}"                     # 10 s
    for pid in "${pids[@]}"; do
        if running "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    wait_gone 50 "${pids[@]}"                      # 5 s more after SIGKILL
    for name in "$@"; do
        rm -f "$RUN/$name.pid"
    done
}

stop_cluster() {
    # the OSD stops at once (osd_fast_shutdown; a memstore OSD would otherwise write
    # all its RAM to disk on the way out: the data is thrown away with DIR anyway)
    stop_daemons KILL osd.0
    stop_daemons TERM mgr.x
    stop_daemons TERM mon.a
}

if [ "$CMD" = stop ]; then
    [ -d "$RUN" ] || exit 0
    stop_cluster
    exit 0
fi
[ "$CMD" = start ] || usage

# --------------------------------------------------------------------------- start

TIMEOUT=${CEPH_START_TIMEOUT:-90}
STORE=${CEPH_OBJECTSTORE:-memstore}
OSD_BYTES=${CEPH_OSD_BYTES:-$((16 << 30))}
START_NS=$(date +%s%N)

missing=""
for tool in ceph-mon:ceph-mon ceph-mgr:ceph-mgr ceph-osd:ceph-osd ceph:ceph-common \
            ceph-authtool:ceph-common monmaptool:ceph-common python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
[ -z "$missing" ] || die 2 "Ceph is not installed (missing:$(echo "$missing" | tr ' ' '\n' |
    sort -u | tr '\n' ' ' | sed 's/ $//'); apt-get install ceph-mon ceph-mgr ceph-osd ceph-common)"
/usr/bin/python3 -c 'import rados' 2>/dev/null ||
    die 2 "python3-rados is not installed (apt-get install ceph-common)"
case $STORE in
    memstore|bluestore) ;;
    *) die 2 "CEPH_OBJECTSTORE must be memstore or bluestore, not '$STORE'" ;;
esac
avail_mb=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
[ "${avail_mb:-0}" -ge 1024 ] ||
    die 2 "not enough memory for a Ceph cluster: ${avail_mb:-?} MiB available, 1024 needed"
if our_pid mon.a >/dev/null || our_pid mgr.x >/dev/null || our_pid osd.0 >/dev/null; then
    die 2 "a cluster is already running in $DIR (ceph.sh stop $DIR first)"
fi

# a fresh cluster: the state of an earlier one in DIR goes (only our own names)
rm -rf "$DIR/mon" "$DIR/mgr" "$DIR/osd" "$DIR/mgr-modules" "$RUN" "$LOG" "$DIR/crash" \
       "$DIR/keys" "$DIR/osd.block" "$DIR/monmap" "$DIR/ceph.conf" "$DIR/keyring"
mkdir -p "$DIR/mon" "$DIR/mgr" "$DIR/osd" "$DIR/mgr-modules" "$RUN" "$LOG" "$DIR/crash" \
         "$DIR/keys"

# the mon's two ports (msgr2, msgr1): free now, and outside both the kernel's range for
# outgoing connections (no client can take them meanwhile) and Ceph's 6800-7300 (the
# OSD's and the mgr's)
read -r PORT2 PORT1 < <(/usr/bin/python3 - <<'EOF'
import random
import socket

with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    low, high = map(int, f.read().split())
ports = []
while len(ports) < 2:
    port = random.randrange(10000, 65536)
    if low <= port <= high or port in ports:
        continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    ports.append(port)
print(*ports)
EOF
)
FSID=$(cat /proc/sys/kernel/random/uuid)
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
CONF=$DIR/ceph.conf
MON_ADDRS="[v2:127.0.0.1:$PORT2,v1:127.0.0.1:$PORT1]"

# admin sockets only where the path fits a unix socket (108 bytes)
if [ ${#RUN} -le 80 ]; then ASOK="$RUN/\$name.asok"; else ASOK=""; fi

# only the mgr modules a test cluster uses: each module the mgr finds is loaded into
# its Python (the full set doubles its memory and its start time)
MGR_SRC=/usr/share/ceph/mgr
for f in "$MGR_SRC"/*.py; do
    if [ -e "$f" ]; then ln -s "$f" "$DIR/mgr-modules/"; fi
done
# (the always-on ones: a missing one is a HEALTH_ERR)
for m in balancer crash devicehealth orchestrator pg_autoscaler progress rbd_support \
         status telemetry volumes; do
    if [ -e "$MGR_SRC/$m" ]; then ln -s "$MGR_SRC/$m" "$DIR/mgr-modules/$m"; fi
done

cat >"$CONF" <<EOF
# a single-node test cluster made by scripts/ceph.sh; everything lives in $DIR
[global]
fsid = $FSID
mon host = $MON_ADDRS
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $RUN
admin socket = $ASOK
crash dir = $DIR/crash
log file = $LOG/\$name.log
mon cluster log file = $LOG/cluster.log
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
mgr stats period = 1
osd mon report interval = 1

[mon]
mon data = $DIR/mon
keyring = $DIR/keys/cluster.keyring
mgr initial modules = status
# propose map changes at once (a one-mon cluster has nobody to batch for)
paxos propose interval = 0.01
paxos min wait = 0.01
mon osd auto mark new in = true

[mgr]
mgr data = $DIR/mgr
keyring = $DIR/keys/cluster.keyring
mgr module path = $DIR/mgr-modules

[osd]
osd data = $DIR/osd
keyring = $DIR/keys/cluster.keyring
osd objectstore = $STORE
memstore device bytes = $OSD_BYTES
bluestore block path = $DIR/osd.block
bluestore block create = true
bluestore block size = $OSD_BYTES
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mount = false
osd memory target = 1073741824
osd crush update on start = true
osd fast shutdown = true

[client]
keyring = $DIR/keyring
admin socket =
log file =
client mount timeout = 15
rados mon op timeout = 60
EOF

# keys, made without any conf (ceph-authtool applies a conf's sections to itself)
authtool() { CEPH_CONF=/dev/null ceph-authtool "$@" >/dev/null; }
K=$DIR/keys/cluster.keyring
authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
authtool --create-keyring "$K" --gen-key -n mon. --cap mon 'allow *'
authtool "$K" --gen-key -n mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' \
    --cap mds 'allow *'
authtool "$K" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' \
    --cap osd 'allow *'
authtool "$K" --import-keyring "$DIR/keyring"

# phase NAME: the time since start, in LOG/start.times (where the seconds go)
phase() { echo "$(( ($(date +%s%N) - START_NS) / 1000000 )) ms $1" >>"$LOG/start.times"; }
phase "keys and conf written"

fail() {            # stop what was started, then one line
    stop_cluster >/dev/null 2>&1 || true
    die 1 "$*"
}

# last_error NAME: the daemon's last error line in its log (for the one-line error)
last_error() {
    local line
    line=$(grep -hiE 'error|fail|unable|denied|abort' "$LOG/$1.log" "$LOG/$1.out" 2>/dev/null |
           tail -n 1 | cut -c1-200) || true
    echo "${line:-no error logged}"
}

# start NAME CMD...: in the background, its output in LOG, its PID in RUN
start_daemon() {
    local name=$1
    shift
    "$@" </dev/null >"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.pid"
}

# the mon's store and the OSD's store are made side by side (the OSD's mkfs needs no
# mon: --no-mon-config, the fsid comes from the conf)
monmaptool --create --fsid "$FSID" --addv a "$MON_ADDRS" "$DIR/monmap" >/dev/null 2>&1 ||
    fail "monmaptool could not make the monmap"
timeout 30 ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" --no-mon-config \
    </dev/null >"$LOG/osd.0.mkfs.out" 2>&1 &
osd_mkfs=$!
timeout 30 ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$K" \
    </dev/null >"$LOG/mon.a.mkfs.out" 2>&1 || true
# ceph-mon --mkfs can exit 0 having made nothing: judge it by its store
[ -d "$DIR/mon/store.db" ] ||
    { wait $osd_mkfs || true; fail "ceph-mon --mkfs failed: $(last_error mon.a.mkfs)"; }
phase "mon store made"
start_daemon mon.a ceph-mon -f -c "$CONF" -i a
start_daemon mgr.x ceph-mgr -f -c "$CONF" -i x
wait $osd_mkfs || fail "ceph-osd --mkfs ($STORE) failed: $(last_error osd.0.mkfs)"
phase "osd store made"

# the rest through one librados client: register the OSD, start it, make the pool,
# wait until a write to it lands and the cluster says HEALTH_OK (bounded)
elapsed=$(( ($(date +%s%N) - START_NS) / 1000000000 ))
left=$(( TIMEOUT - elapsed ))
[ $left -gt 5 ] || left=5
set +e
msg=$(/usr/bin/python3 - "$CONF" "$DIR" "$OSD_UUID" "$left" "$START_NS" <<'EOF' 2>&1
import json
import os
import subprocess
import sys
import time

import rados

conf, d, osd_uuid, budget = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
start_ns = int(sys.argv[5])
deadline = time.monotonic() + budget
run, log = os.path.join(d, "run"), os.path.join(d, "log")


def phase(what):
    with open(os.path.join(log, "start.times"), "a") as f:
        f.write(f"{(time.time_ns() - start_ns) // 1000000} ms {what}\n")


def alive(name):
    with open(os.path.join(run, name + ".pid")) as f:
        pid = int(f.read())
    try:                                # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def check_daemons():
    for name in ("mon.a", "mgr.x", "osd.0"):
        if os.path.exists(os.path.join(run, name + ".pid")) and not alive(name):
            sys.exit(f"ceph-{name.split('.')[0]} ({name}) exited during start")


def command(cluster, **cmd):
    ret, out, err = cluster.mon_command(json.dumps(cmd), b"", timeout=10)
    if ret != 0:
        sys.exit(f"ceph {cmd['prefix']} failed: {err or ret}")
    return out


# a short objecter tick: a write sent before the OSD is up is resent as soon as the
# new osdmap is known (the default tick, 5 s, was most of the start time)
CLIENT_CONF = {"client_mount_timeout": "5", "rados_osd_op_timeout": "2",
               "objecter_tick_interval": "0.1"}
cluster = rados.Rados(conffile=conf, rados_id="admin", conf=CLIENT_CONF)
while True:
    check_daemons()
    try:
        cluster.connect(timeout=5)
        break
    except rados.Error as e:
        if time.monotonic() > deadline:
            sys.exit(f"the mon at {conf} did not answer: {e}")
        cluster = rados.Rados(conffile=conf, rados_id="admin",
                              conf=CLIENT_CONF)
        time.sleep(0.2)

phase("mon answers")
# the mgr's devicehealth module would make a pool of its own as soon as it sees the OSD
command(cluster, prefix="config set", who="mgr", name="mgr/devicehealth/enable_monitoring",
        value="false", force=True)
command(cluster, prefix="osd new", uuid=osd_uuid, id=0)
with open(os.path.join(log, "osd.0.out"), "wb") as out:
    p = subprocess.Popen(["ceph-osd", "-f", "-c", conf, "-i", "0"], stdin=subprocess.DEVNULL,
                         stdout=out, stderr=subprocess.STDOUT)
with open(os.path.join(run, "osd.0.pid"), "w") as f:
    f.write(f"{p.pid}\n")
command(cluster, prefix="osd pool create", pool="rbd", pg_num=8, pgp_num=8)
command(cluster, prefix="osd pool application enable", pool="rbd", app="rbd")
phase("osd started, pool rbd made")

# ready: a write to the pool lands, the mgr is active and has seen every PG
# active+clean, and the cluster says HEALTH_OK
wrote = False
status = "no answer"
while time.monotonic() < deadline:
    check_daemons()
    if not wrote:
        try:
            with cluster.open_ioctx("rbd") as io:
                io.write_full("ceph.sh-probe", b"ok")
                io.remove_object("ceph.sh-probe")
            wrote = True
            phase("pool rbd writable")
        except rados.Error as e:
            status = f"pool rbd not writable yet ({e})"
    if wrote:
        ret, out, err = cluster.mon_command(json.dumps({"prefix": "status", "format": "json"}),
                                            b"", timeout=10)
        if ret == 0:
            st = json.loads(out)
            health = st["health"]
            pgmap = st.get("pgmap", {})
            states = {s["state_name"]: s["count"] for s in pgmap.get("pgs_by_state", [])}
            if not st.get("mgrmap", {}).get("available"):
                status = "the mgr is not active"
            elif not pgmap.get("num_pgs") or states != {"active+clean": pgmap["num_pgs"]}:
                status = f"PGs not all active+clean: {states or 'none reported'}"
            elif health.get("status") != "HEALTH_OK":
                status = health.get("status", "?") + ": " + "; ".join(
                    c["summary"]["message"] for c in health.get("checks", {}).values())
            else:
                phase("mgr active, PGs active+clean, HEALTH_OK")
                sys.exit(0)
    time.sleep(0.1)
sys.exit(f"not ready after {budget:.0f} s: {status}")
EOF
)
rc=$?
set -e
if [ $rc != 0 ]; then
    line=$(printf '%s\n' "$msg" | tail -n 1)
    case $line in
        *"exited during start"*)
            name=$(sed 's/.*(\(.*\)).*/\1/' <<<"$line")
            line="$line: $(last_error "$name")" ;;
    esac
    fail "$line (logs in $LOG)"
fi
ms=$(( ($(date +%s%N) - START_NS) / 1000000 ))
echo "ceph.sh: cluster up in $((ms / 1000)).$(printf %03d $((ms % 1000))) s" \
     "(mon 127.0.0.1:$PORT2, $STORE): CEPH_CONF=$CONF"
