#!/usr/bin/env bash
# Edge testbed: N emulated hosts as Linux network namespaces on one bridge, with optional per-host
# bandwidth caps (tc tbf) and one-way delays (applied by devtools/delay_relay.py). Run as root. See
# `testbed.sh help`.
set -euo pipefail

# ---------------------------------------------------------------------------------------------------
# Fixed layout. Everything this script creates carries the "es-" prefix (or is the bridge esbr0), and
# `down` removes exactly those objects, nothing else.
# ---------------------------------------------------------------------------------------------------
readonly PREFIX="es-"
readonly NS_PREFIX="${PREFIX}host"      # namespaces es-host1 .. es-hostN
readonly VETH_PREFIX="${PREFIX}veth"    # bridge-side veth ends es-veth1 .. es-vethN
readonly BRIDGE="esbr0"
readonly NET="10.213.0"                 # dedicated private /24; host i is $NET.(1+i)
readonly GATEWAY="${NET}.1"
readonly MAX_HOSTS=253
readonly TBF_LATENCY="100ms"            # tbf queue bound (how long a packet may wait), not added delay
readonly MIN_BURST=32768                # bytes; tbf bucket is 20 ms at the rate, within MIN..MAX_BURST
readonly MAX_BURST=8388608
readonly IPT_COMMENT="edgeswarm-testbed"
readonly LOCK_FILE="/run/edgeswarm-testbed.lock"
readonly DELAY_DIR="/run/edgeswarm-testbed/delay"  # one file per delayed host: its address, holding ms
readonly MAX_DELAY_MS=10000

PROG="$(basename "$0")"

usage() {
  cat <<EOF
Usage: $PROG COMMAND [ARGS]

Manages an edge testbed: N "hosts" as network namespaces ${NS_PREFIX}1..${NS_PREFIX}N, each with one
veth link to the bridge $BRIDGE (root namespace, ${GATEWAY}/24). Host i has address ${NET}.(1+i)/24 on
its interface eth0, a default route via $GATEWAY, lo up, and a 224.0.0.0/4 route on eth0 so that
multicast (mDNS, 224.0.0.251:5353) works between hosts. The bridge floods multicast (snooping off).
Must run as root.

Commands:
  up N [--rate RATE] [--delay DELAY] [--force]
                  Create the bridge and hosts 1..N (1 <= N <= $MAX_HOSTS) and print a table of them.
                  --rate caps every host's link in BOTH directions (upload: tbf on eth0 inside the
                  host; download: tbf on the host's bridge-side veth). RATE is a tc rate up to 100gbit:
                  20mbit, 512kbit, 1gbit (bit units) or 2mbps (bytes/s). --delay gives every host the
                  one-way delay DELAY (see 'delay'). If a testbed already exists, 'up' fails with a
                  message; --force tears it down first. A failed 'up' removes whatever it had created.
  down            Remove every ${NS_PREFIX}* namespace, ${VETH_PREFIX}* link and the bridge $BRIDGE
                  (processes still running inside a testbed namespace get SIGTERM, then SIGKILL after
                  2 s). Succeeds when nothing exists.
  exec HOST CMD...
                  Run CMD inside HOST (exit status is CMD's). HOST is 1, host1 or ${NS_PREFIX}1.
  status          List the bridge, hosts, addresses, link states and qdiscs.
  cut HOST        Take HOST's link down (its bridge-side veth), simulating a cut cable.
  restore HOST    Bring HOST's link back up.
  rate HOST RATE  Change HOST's cap (both directions); RATE 'none' (or off, 0) removes the cap.
  delay HOST DELAY
                  Delay everything HOST sends by DELAY (one way, as netem on its eth0 would), so a
                  round trip between hosts A and B gains delay(A) + delay(B). DELAY is a number with
                  unit us, ms or s, up to ${MAX_DELAY_MS}ms; 0ms (or none, off, 0) removes it. Applied by
                  delay relays (devtools/delay_relay.py) in front of relayed ports only (see Notes).
                  They read $DELAY_DIR/<host address>
                  at least every second, so a change reaches running connections.
  help, --help    Show this text.

Notes:
  * netem delay is NOT available on these machines, so the kernel adds no delay and no loss: tbf
    queues at most $TBF_LATENCY per direction (that bounds queueing delay, it adds none on an idle
    link), and 'delay' only takes effect on ports served through a delay relay (as a node started by
    devtools/testbed.py's Testbed.start_node(HOST, ARGS) is): a node's gRPC data plane, not its DHT
    (libp2p) traffic, nor anything else.
  * Hosts reach each other and the bridge address only: IP forwarding in the root namespace is left
    untouched and there is no NAT, so testbed traffic never leaves the bridge.
  * Bridge netfilter: when br_netfilter is loaded (net.bridge.bridge-nf-call-iptables=1) bridged
    packets traverse the root namespace's iptables FORWARD chain (the bridge's own nf_call_* options,
    set to 0 by 'up', cannot override that global sysctl). So if an 'iptables' binary exists and the
    FORWARD chain is not a plain ACCEPT policy, 'up' inserts one rule "-i $BRIDGE -o $BRIDGE -j ACCEPT"
    (comment "$IPT_COMMENT") that 'down' removes. nftables rules are not inspected; 'status'
    reports the br_netfilter sysctl.
  * Commands are serialized with flock on $LOCK_FILE.

Examples:
  $PROG up 3 --rate 20mbit --delay 10ms
  $PROG delay host2 40ms
  $PROG exec host2 python3 -c 'print("hi")'
  $PROG cut 2; sleep 5; $PROG restore 2
  $PROG down
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

require_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, bridges and tc need CAP_NET_ADMIN)"
  command -v ip >/dev/null || die "'ip' (iproute2) not found"
  command -v tc >/dev/null || die "'tc' (iproute2) not found"
}

take_lock() {
  if command -v flock >/dev/null; then
    exec 9>"$LOCK_FILE"
    flock -w 60 9 || die "another $PROG command holds $LOCK_FILE"
  fi
}

# --- names -----------------------------------------------------------------------------------------

# Host index from "3", "host3" or "es-host3".
host_index() {
  local h="$1"
  h="${h#"$PREFIX"}"
  h="${h#host}"
  [[ "$h" =~ ^[0-9]+$ ]] && [ "$h" -ge 1 ] && [ "$h" -le "$MAX_HOSTS" ] || die "bad host '$1' (use 1, host1 or ${NS_PREFIX}1)"
  echo $((10#$h))
}
ns_name() { echo "${NS_PREFIX}$1"; }
veth_name() { echo "${VETH_PREFIX}$1"; }
host_ip() { echo "${NET}.$((1 + $1))"; }
# Deterministic, locally administered MACs: 02:65:73 ("es"), then 00 = host side / 01 = bridge side.
host_mac() { printf '02:65:73:00:00:%02x' "$1"; }
port_mac() { printf '02:65:73:01:00:%02x' "$1"; }
readonly BRIDGE_MAC="02:65:73:ff:00:01"

# (Lists are captured before matching: `grep -q` in a pipeline can fail it under pipefail via SIGPIPE.)
ns_exists() {
  local names
  names="$(ip netns list 2>/dev/null | awk '{print $1}')"
  grep -qx -- "$1" <<<"$names"
}
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

# Bridge-side veth ends that exist.
existing_veths() {
  local names
  names="$(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//')"
  grep "^${VETH_PREFIX}[0-9][0-9]*\$" <<<"$names" || true
}

# Existing testbed host indices, sorted.
existing_hosts() {
  ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^${NS_PREFIX}\([0-9][0-9]*\)\$/\1/p" | sort -n
}

resolve_host() {
  local i
  i="$(host_index "$1")"
  ns_exists "$(ns_name "$i")" || die "host $i ($(ns_name "$i")) does not exist; is the testbed up?"
  echo "$i"
}

# --- rates -----------------------------------------------------------------------------------------

# Bytes per second of a tc rate string (bit, kbit, mbit, gbit, bps, kbps, mbps, gbps); fails if bad.
rate_bytes() {
  local r="${1,,}" num unit
  [[ "$r" =~ ^([0-9]+(\.[0-9]+)?)([a-z]*)$ ]] || return 1
  num="${BASH_REMATCH[1]}"
  unit="${BASH_REMATCH[3]}"
  local mult
  case "$unit" in
    ""|bit) mult="0.125" ;;
    kbit) mult="125" ;;
    mbit) mult="125000" ;;
    gbit) mult="125000000" ;;
    bps) mult="1" ;;
    kbps) mult="1000" ;;
    mbps) mult="1000000" ;;
    gbps) mult="1000000000" ;;
    *) return 1 ;;
  esac
  # 1 byte/s .. 100 Gbit/s
  awk -v n="$num" -v m="$mult" 'BEGIN { b = n * m; if (b < 1 || b > 12500000000) exit 1; printf "%d\n", b }'
}

is_no_rate() { case "${1,,}" in none|off|0|unlimited) return 0 ;; *) return 1 ;; esac; }

validate_rate() {
  rate_bytes "$1" >/dev/null || die "bad rate '$1' (examples: 20mbit, 512kbit, 1gbit, 2mbps)"
}

# Cap one host at RATE in both directions (replaces any previous cap).
apply_rate() {
  local i="$1" rate="$2" bytes burst
  bytes="$(rate_bytes "$rate")"
  burst=$((bytes / 50))
  [ "$burst" -ge "$MIN_BURST" ] || burst="$MIN_BURST"
  [ "$burst" -le "$MAX_BURST" ] || burst="$MAX_BURST"
  # Upload: egress of eth0 inside the host.
  ip netns exec "$(ns_name "$i")" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" latency "$TBF_LATENCY"
  # Download: egress of the bridge-side veth (what the bridge sends to the host).
  tc qdisc replace dev "$(veth_name "$i")" root tbf rate "$rate" burst "$burst" latency "$TBF_LATENCY"
}

clear_rate() {
  local i="$1"
  ip netns exec "$(ns_name "$i")" tc qdisc del dev eth0 root 2>/dev/null || true
  tc qdisc del dev "$(veth_name "$i")" root 2>/dev/null || true
}

# --- delays ----------------------------------------------------------------------------------------

is_no_delay() { case "${1,,}" in none|off|0) return 0 ;; *) return 1 ;; esac; }

# Milliseconds of a delay string (500us, 20ms, 1.5s), printed as a decimal; fails if bad or too long.
delay_ms() {
  local d="${1,,}"
  [[ "$d" =~ ^([0-9]+(\.[0-9]+)?)(us|ms|s)$ ]] || return 1
  awk -v n="${BASH_REMATCH[1]}" -v u="${BASH_REMATCH[3]}" -v max="$MAX_DELAY_MS" \
    'BEGIN { ms = (u == "us") ? n / 1000 : (u == "s") ? n * 1000 : n; if (ms > max) exit 1; printf "%g\n", ms }'
}

validate_delay() {
  is_no_delay "$1" || delay_ms "$1" >/dev/null || die "bad delay '$1' (examples: 20ms, 500us, 0.1s, none; at most ${MAX_DELAY_MS}ms)"
}

delay_file() { echo "$DELAY_DIR/$(host_ip "$1")"; }

# Set host i's one-way delay (0 or none removes it); the file is replaced atomically for the relays.
apply_delay() {
  local i="$1" ms=0
  is_no_delay "$2" || ms="$(delay_ms "$2")"
  if [ "$(awk -v ms="$ms" 'BEGIN { print (ms > 0) }')" = 1 ]; then
    mkdir -p "$DELAY_DIR"
    echo "$ms" >"$(delay_file "$i").tmp"
    mv -f "$(delay_file "$i").tmp" "$(delay_file "$i")"
  else
    rm -f "$(delay_file "$i")"
  fi
}

# "20ms", or "-" without a delay.
delay_summary() {
  local f
  f="$(delay_file "$1")"
  if [ -r "$f" ]; then echo "$(cat "$f")ms"; else echo "-"; fi
}

clear_delays() {
  rm -rf "$DELAY_DIR"
  rmdir "$(dirname "$DELAY_DIR")" 2>/dev/null || true
}

# --- netfilter -------------------------------------------------------------------------------------

br_netfilter_on() {
  [ -r /proc/sys/net/bridge/bridge-nf-call-iptables ] && [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables)" = 1 ]
}

# If bridged packets go through an iptables FORWARD chain that is not a plain ACCEPT, let ours pass.
open_forward() {
  br_netfilter_on || return 0
  command -v iptables >/dev/null || return 0
  local rules
  rules="$(iptables -w 5 -S FORWARD 2>/dev/null)" || return 0
  if [ "$rules" = "-P FORWARD ACCEPT" ]; then
    return 0
  fi
  if ! iptables -w 5 -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment "$IPT_COMMENT" -j ACCEPT 2>/dev/null; then
    iptables -w 5 -I FORWARD 1 -i "$BRIDGE" -o "$BRIDGE" -m comment --comment "$IPT_COMMENT" -j ACCEPT
    log "br_netfilter is on and iptables FORWARD is not plain ACCEPT: inserted an ACCEPT rule for $BRIDGE"
  fi
}

close_forward() {
  command -v iptables >/dev/null || return 0
  local n=0
  while [ "$n" -lt 20 ] && iptables -w 5 -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment "$IPT_COMMENT" -j ACCEPT 2>/dev/null; do
    n=$((n + 1))
  done
}

# --- commands --------------------------------------------------------------------------------------

create_bridge() {
  ip link add "$BRIDGE" type bridge stp_state 0 forward_delay 0 mcast_snooping 0 \
    nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0
  ip link set dev "$BRIDGE" address "$BRIDGE_MAC"
  ip addr add "${GATEWAY}/24" dev "$BRIDGE"
  ip link set dev "$BRIDGE" up
}

create_host() {
  local i="$1" ns veth ip
  ns="$(ns_name "$i")"
  veth="$(veth_name "$i")"
  ip="$(host_ip "$i")"
  ip netns add "$ns"
  ip link add "$veth" address "$(port_mac "$i")" type veth peer name eth0 address "$(host_mac "$i")" netns "$ns"
  ip link set dev "$veth" master "$BRIDGE"
  ip link set dev "$veth" up
  local nsx=(ip netns exec "$ns")
  "${nsx[@]}" ip link set dev lo up
  # No IPv6 duplicate address detection: link-local addresses are usable at once (MACs are unique).
  "${nsx[@]}" sysctl -qw net.ipv6.conf.eth0.accept_dad=0 2>/dev/null || true
  "${nsx[@]}" ip link set dev eth0 multicast on
  "${nsx[@]}" ip addr add "${ip}/24" dev eth0
  "${nsx[@]}" ip link set dev eth0 up
  "${nsx[@]}" ip route add default via "$GATEWAY" dev eth0
  # Explicit multicast route: sockets that send to / join 224.0.0.251 without naming an interface use eth0.
  "${nsx[@]}" ip route add 224.0.0.0/4 dev eth0
}

testbed_exists() {
  link_exists "$BRIDGE" && return 0
  [ -n "$(existing_hosts)" ] && return 0
  [ -n "$(existing_veths)" ] && return 0
  return 1
}

cmd_up() {
  local n="" rate="" delay="" force=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --rate) [ $# -ge 2 ] || die "--rate needs a value"; rate="$2"; shift 2 ;;
      --rate=*) rate="${1#--rate=}"; shift ;;
      --delay) [ $# -ge 2 ] || die "--delay needs a value"; delay="$2"; shift 2 ;;
      --delay=*) delay="${1#--delay=}"; shift ;;
      --force|-f) force=1; shift ;;
      -*) die "up: unknown option '$1'" ;;
      *) [ -z "$n" ] || die "up: unexpected argument '$1'"; n="$1"; shift ;;
    esac
  done
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le "$MAX_HOSTS" ] || die "up: N must be 1..$MAX_HOSTS (usage: $PROG up N [--rate RATE] [--delay DELAY] [--force])"
  if [ -n "$rate" ]; then
    if is_no_rate "$rate"; then rate=""; else validate_rate "$rate"; fi
  fi
  if [ -n "$delay" ]; then
    validate_delay "$delay"
  fi

  if testbed_exists; then
    if [ "$force" -eq 1 ]; then
      log "a testbed exists; --force: tearing it down first"
      do_down
    else
      die "a testbed already exists (bridge $BRIDGE or ${NS_PREFIX}* namespaces); run '$PROG down' first or use 'up N --force'"
    fi
  fi

  # Roll back a half-built testbed if any step fails.
  trap 'rc=$?; if [ $rc -ne 0 ]; then log "up failed; removing what was created"; do_down >/dev/null 2>&1 || true; fi' EXIT
  clear_delays  # a stale state directory (no testbed owns it now)
  create_bridge
  open_forward
  local i
  for ((i = 1; i <= n; i++)); do
    create_host "$i"
    if [ -n "$rate" ]; then apply_rate "$i" "$rate"; fi
    if [ -n "$delay" ]; then apply_delay "$i" "$delay"; fi
  done
  trap - EXIT

  printf '%-6s %-10s %-14s %-10s %-10s %s\n' HOST NAMESPACE ADDRESS PORT RATE DELAY
  for ((i = 1; i <= n; i++)); do
    printf '%-6s %-10s %-14s %-10s %-10s %s\n' "host$i" "$(ns_name "$i")" "$(host_ip "$i")/24" "$(veth_name "$i")" "${rate:-uncapped}" "$(delay_summary "$i")"
  done
  echo "bridge $BRIDGE ${GATEWAY}/24; delays apply to relayed ports only (devtools/delay_relay.py), there is no netem here"
}

# Terminate processes left inside a namespace: SIGTERM, then SIGKILL after 2 s.
kill_ns_pids() {
  local ns="$1" pids
  pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
  [ -n "${pids// /}" ] || return 0
  log "terminating processes in $ns: $pids"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  local t
  for t in 1 2 3 4 5 6 7 8 9 10; do
    pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    [ -n "${pids// /}" ] || return 0
    sleep 0.2
  done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
}

do_down() {
  local i ns link
  for i in $(existing_hosts); do
    kill_ns_pids "$(ns_name "$i")"
  done
  # Bridge-side veth ends (deleting one end deletes its peer inside the namespace too).
  for link in $(existing_veths); do
    ip link del dev "$link" 2>/dev/null || true
  done
  for i in $(existing_hosts); do
    ip netns del "$(ns_name "$i")" 2>/dev/null || true
  done
  if link_exists "$BRIDGE"; then
    ip link del dev "$BRIDGE" || true
  fi
  close_forward
  clear_delays
}

cmd_down() {
  [ $# -eq 0 ] || die "down takes no arguments"
  do_down
  if testbed_exists; then
    die "down: some testbed objects remain (see '$PROG status')"
  fi
  echo "testbed down"
}

cmd_exec() {
  [ $# -ge 2 ] || die "usage: $PROG exec HOST CMD..."
  local i
  i="$(resolve_host "$1")"
  shift
  exec ip netns exec "$(ns_name "$i")" "$@"
}

cmd_status() {
  [ $# -eq 0 ] || die "status takes no arguments"
  if ! testbed_exists; then
    echo "no testbed (no bridge $BRIDGE, no ${NS_PREFIX}* namespaces)"
    return 0
  fi
  if link_exists "$BRIDGE"; then
    echo "bridge $BRIDGE: $(ip -br addr show dev "$BRIDGE" | awk '{print $2, $3}')"
  else
    echo "bridge $BRIDGE: missing"
  fi
  if br_netfilter_on; then
    echo "br_netfilter: on (bridge-nf-call-iptables=1; bridged packets pass iptables FORWARD)"
  else
    echo "br_netfilter: off"
  fi
  printf '%-6s %-10s %-16s %-6s %-8s %-26s %s\n' HOST NAMESPACE ADDRESS LINK DELAY "UPLOAD (eth0 in host)" "DOWNLOAD (bridge port)"
  local i ns veth addr state up down up_re='[<,]UP[,>]'
  for i in $(existing_hosts); do
    ns="$(ns_name "$i")"
    veth="$(veth_name "$i")"
    addr="$(ip netns exec "$ns" ip -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}' | head -n1)"
    if link_exists "$veth"; then
      if [[ "$(ip -o link show dev "$veth")" =~ $up_re ]]; then state=up; else state=CUT; fi
      down="$(tc qdisc show dev "$veth" root 2>/dev/null | head -n1)"
    else
      state=missing
      down="-"
    fi
    up="$(ip netns exec "$ns" tc qdisc show dev eth0 root 2>/dev/null | head -n1)"
    printf '%-6s %-10s %-16s %-6s %-8s %-26s %s\n' "host$i" "$ns" "${addr:--}" "$state" "$(delay_summary "$i")" "$(qdisc_summary "$up")" "$(qdisc_summary "$down")"
  done
}

# "qdisc tbf 8001: root refcnt 2 rate 5Mbit burst 32Kb lat 100ms" -> "tbf rate 5Mbit burst 32Kb"
qdisc_summary() {
  local q="$1"
  [ -n "$q" ] || { echo "-"; return; }
  awk '{ kind = $2; out = kind; for (i = 3; i < NF; i++) if ($i == "rate" || $i == "burst") out = out " " $i " " $(i + 1); print out }' <<<"$q"
}

cmd_cut() {
  [ $# -eq 1 ] || die "usage: $PROG cut HOST"
  local i
  i="$(resolve_host "$1")"
  ip link set dev "$(veth_name "$i")" down
  echo "host$i: link cut"
}

cmd_restore() {
  [ $# -eq 1 ] || die "usage: $PROG restore HOST"
  local i
  i="$(resolve_host "$1")"
  ip link set dev "$(veth_name "$i")" up
  echo "host$i: link restored"
}

cmd_rate() {
  [ $# -eq 2 ] || die "usage: $PROG rate HOST RATE|none"
  local i
  i="$(resolve_host "$1")"
  if is_no_rate "$2"; then
    clear_rate "$i"
    echo "host$i: uncapped"
  else
    validate_rate "$2"
    apply_rate "$i" "$2"
    echo "host$i: capped at $2 (both directions)"
  fi
}

cmd_delay() {
  [ $# -eq 2 ] || die "usage: $PROG delay HOST DELAY|none"
  local i
  i="$(resolve_host "$1")"
  validate_delay "$2"
  apply_delay "$i" "$2"
  echo "host$i: one-way delay $(delay_summary "$i" | sed 's/^-$/none/')"
}

main() {
  local cmd="${1:-help}"
  [ $# -eq 0 ] || shift
  case "$cmd" in
    help|-h|--help) usage; return 0 ;;
  esac
  require_root
  case "$cmd" in
    up) take_lock; cmd_up "$@" ;;
    down) take_lock; cmd_down "$@" ;;
    exec) cmd_exec "$@" ;;
    status) cmd_status "$@" ;;
    cut) take_lock; cmd_cut "$@" ;;
    restore) take_lock; cmd_restore "$@" ;;
    rate) take_lock; cmd_rate "$@" ;;
    delay) take_lock; cmd_delay "$@" ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
}

main "$@"
