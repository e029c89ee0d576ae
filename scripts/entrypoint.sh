#!/bin/sh
# The container's entry point (PID 1): prepares the run dir, runs supervisord, forwards TERM and
# INT to it, and turns how the stack ended into the container's exit status.
#
# Why a wrapper: supervisord exits 0 whenever it is told to stop, so a failure that no restart
# can fix (a bad setting, no driver with failOnInitError=true, a MIG layout the strategy cannot
# serve) or a crash loop (FATAL) would end the pod as Completed. A service that fails for good
# exits 78 and writes its cause to $GPU_PLUGIN_EXIT_CAUSE; supervisord's event listener then
# stops supervisord at once (instead of three futile restarts), and this script exits 1 with
# the cause as the container's last log line, as NVIDIA's plugin does. A plain SIGTERM from the
# kubelet ends with 0. sh, not Python: this process lives on every GPU node (~1 MB, not ~15).
#
# Usage: entrypoint.sh [-c supervisord.conf]
set -u

conf=/etc/gpu-plugin/supervisord.conf
if [ "$#" -eq 2 ] && [ "$1" = "-c" ]; then
    conf=$2
elif [ "$#" -ne 0 ]; then
    echo "usage: $0 [-c supervisord.conf]" >&2
    exit 64
fi

die() {
    echo "gpu-plugin: cannot start: $*" >&2
    exit 1
}

run_dir=${GPU_PLUGIN_RUN_DIR:-}
[ -n "$run_dir" ] || die "GPU_PLUGIN_RUN_DIR is not set (the directory for the bus and supervisor sockets)"
# Never through a symlink: our sockets would live where someone else chose, and chmod would
# change the mode of its target.
[ -L "$run_dir" ] && die "run dir $run_dir is a symlink: refusing to follow it; make it a directory of its own"
if [ ! -e "$run_dir" ]; then
    mkdir -p -m 0700 "$run_dir" || die "cannot create the run dir $run_dir"
fi
[ -L "$run_dir" ] && die "run dir $run_dir is a symlink: refusing to follow it; make it a directory of its own"
[ -d "$run_dir" ] || die "run dir $run_dir is not a directory"
[ -O "$run_dir" ] || die "run dir $run_dir is owned by uid $(stat -c %u "$run_dir"), not by this process (uid $(id -u)): refusing it"
chmod 0700 "$run_dir" || die "cannot make the run dir $run_dir private"

GPU_PLUGIN_EXIT_CAUSE=$run_dir/exit-cause
export GPU_PLUGIN_EXIT_CAUSE
rm -f "$GPU_PLUGIN_EXIT_CAUSE" || die "cannot remove the old $GPU_PLUGIN_EXIT_CAUSE"

# gpu-plugin-supervisord is supervisord that acts on a signal or a child's exit at once, where
# the stock one waits for its 1 s poll (services/supervisord.py): a SIGTERM stops the stack in
# ~0.1 s, with no help from here.
gpu-plugin-supervisord -c "$conf" &
pid=$!

trap 'kill -TERM "$pid" 2>/dev/null' TERM
trap 'kill -INT "$pid" 2>/dev/null' INT

# A trapped signal interrupts wait with a status above 128 while supervisord still runs: wait
# again until it has really exited.
while :; do
    wait "$pid"
    status=$?
    kill -0 "$pid" 2>/dev/null || break
done

if [ -s "$GPU_PLUGIN_EXIT_CAUSE" ]; then
    IFS= read -r cause <"$GPU_PLUGIN_EXIT_CAUSE"
    echo "gpu-plugin: exiting: $cause" >&2
    exit 1
fi
exit "$status"
