// Package e2e holds the end-to-end tests of snapmeta-snapshotter under a
// real containerd: each test starts a private containerd (its own root,
// state, socket and config) with the daemon as its proxy snapshotter, with
// each driver (native: copies; overlay: overlayfs) on bbolt or on an
// embedded etcd, and drives it with ctr: image import and unpack,
// containers, every ctr snapshots command checked against the store as the
// library reads it, garbage collection, a daemon restart under a live
// containerd, and a SIGKILL in the middle of an unpack.
//
// They run as root with containerd (1.6 or later), ctr, runc and
// containerd-shim-runc-v2 on PATH and a static busybox at /bin/busybox
// (Debian: apt-get install containerd runc busybox-static); otherwise they
// skip, saying what is missing. The package has no code outside its
// tests, so that the rest of the module's tests stay fast to build.
package e2e
