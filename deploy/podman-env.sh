# Sourced by deploy/*.sh (after they define `say` and `die`): installs podman and debootstrap when
# missing, then podman settings for a host that is itself a sandbox.
need() {  # need COMMAND DEBIAN-PACKAGE
  command -v "$1" >/dev/null && return
  say "installing $2 (for $1)"
  apt-get update -q >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2 || die "apt-get install $2 failed"
  command -v "$1" >/dev/null || die "$1 still missing after installing $2"
}
need podman podman
# runc, not crun (which `apt-get install podman` picks first): crun refuses this kind of host's hybrid
# cgroup v1/v2 layout ("crun: cgroups in hybrid mode not supported"); runc runs containers there.
need runc runc
need debootstrap debootstrap

# Rootful podman raises a container's open-files and process limits to the maximum by default; inside a
# sandbox that may not be allowed ("error setting rlimit ... operation not permitted"), so containers get
# this host's own hard limits instead, through a containers.conf of ours (CONTAINERS_CONF), which also
# names runc as the OCI runtime.
deploy_podman_env() {
  local dir=${BASE_CACHE:-/var/cache/classifier-deploy} nofile nproc
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  [ "$nproc" = unlimited ] && nproc=32768
  # A hard limit equal to this host's is refused in some sandboxes (the pids controller); 32768 is plenty.
  [ "$nproc" -gt 32768 ] && nproc=32768
  mkdir -p "$dir"
  printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n[engine]\nruntime = "runc"\n' \
    "$nofile" "$nofile" "$nproc" "$nproc" > "$dir/containers.conf"
  export CONTAINERS_CONF="$dir/containers.conf"
}
deploy_podman_env
