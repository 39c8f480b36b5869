package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

func TestHostFromTheEnvironmentNeedsEtcd(t *testing.T) {
	cmd := exec.Command(binary, "--socket", socketPath(t), "--root", t.TempDir())
	cmd.Env = append(os.Environ(), "SNAPMETA_HOST=a")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 2, ee.ExitCode())
	assert.Contains(t, string(out), "--host a needs an etcd store")

	cmd = exec.Command(binary, "--socket", socketPath(t), "--root", t.TempDir(), "--store", "etcd://127.0.0.1:1/x", "--host", "a")
	cmd.Env = append(os.Environ(), "SNAPMETA_HOST_TTL=soon")
	out, err = cmd.CombinedOutput()
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 2, ee.ExitCode())
	assert.Contains(t, string(out), "$SNAPMETA_HOST_TTL")
}

// TestTwoHostsShareLayersOnOneRootAndOneDataDirectory: two daemons, hosts
// A and B, on one etcd root and one data root; a layer A committed with
// the containerd.io/snapshot.ref label is bound by B's Prepare with the
// same label, which says AlreadyExists.
func TestTwoHostsShareLayersOnOneRootAndOneDataDirectory(t *testing.T) {
	c := etcdtest.Start(t)
	root := filepath.Join(t.TempDir(), "root")
	store := etcdAddress(c, "shared")
	for _, driver := range []string{"native", "overlay"} {
		t.Run(driver, func(t *testing.T) {
			if driver == "overlay" && os.Geteuid() != 0 {
				t.Skip("needs root")
			}
			root := filepath.Join(root, driver)
			etcdRoot := store + "-" + driver
			sa, sb := socketPath(t), socketPath(t)
			// B's host comes from the environment; A's command line wins
			// over it.
			t.Setenv("SNAPMETA_HOST", "B")
			a := serving(t, sa, "--root", root, "--driver", driver, "--store", etcdRoot, "--host", "A")
			b := serving(t, sb, "--root", root, "--driver", driver, "--store", etcdRoot)
			a.waitLog(t, "host=A")
			b.waitLog(t, "host=B")
			ca, cb := client(t, sa), client(t, sb)
			ctx := context.Background()
			const chain = "sha256:0123"
			ref := snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: chain})
			_, err := ca.Prepare(ctx, "a/1/extract", "", ref)
			require.NoError(t, err)
			require.NoError(t, ca.Commit(ctx, "a/2/"+chain, "a/1/extract", ref))
			dirs, err := os.ReadDir(filepath.Join(root, "snapshots"))
			require.NoError(t, err)

			_, err = cb.Prepare(ctx, "b/1/extract", "", ref)
			assert.True(t, errdefs.IsAlreadyExists(err), "B's Prepare: %v", err)
			info, err := cb.Stat(ctx, "b/1/extract")
			require.NoError(t, err)
			assert.Equal(t, snapshots.KindCommitted, info.Kind)
			assert.Equal(t, chain, info.Labels[snapshots.LabelSnapshotRef])
			after, err := os.ReadDir(filepath.Join(root, "snapshots"))
			require.NoError(t, err)
			assert.Len(t, after, len(dirs), "B made no directory")
			// Each daemon sees its own scope only.
			_, err = cb.Stat(ctx, "a/2/"+chain)
			assert.True(t, errdefs.IsNotFound(err), "%v", err)

			// A's removal leaves B's binding and the data.
			require.NoError(t, ca.Remove(ctx, "a/2/"+chain))
			after, err = os.ReadDir(filepath.Join(root, "snapshots"))
			require.NoError(t, err)
			assert.Len(t, after, len(dirs))
			require.NoError(t, cb.Remove(ctx, "b/1/extract"))
			after, err = os.ReadDir(filepath.Join(root, "snapshots"))
			require.NoError(t, err)
			assert.Empty(t, after, "the last binding's removal deletes the data")
			a.stop(t, syscall.SIGTERM)
			b.stop(t, syscall.SIGTERM)
		})
	}
}

// TestRestartWithinTheHostTTLWaitsForTheLease: a daemon killed with
// SIGKILL leaves its host's lease; a new daemon of the host waits, saying
// why, until the lease expires, then serves. A daemon of a host whose
// daemon runs is refused at once on the same data root.
func TestRestartWithinTheHostTTLWaitsForTheLease(t *testing.T) {
	c := etcdtest.Start(t)
	root := filepath.Join(t.TempDir(), "root")
	args := []string{"--root", root, "--store", etcdAddress(c, "restart"), "--host", "A", "--host-ttl", "3s"}
	first := serving(t, socketPath(t), args...)

	second := start(t, socketPath(t), args...)
	assert.Equal(t, 1, second.wait(t, 30*time.Second))
	assert.Contains(t, second.stderr.String(), "host A of data root")

	require.NoError(t, first.cmd.Process.Kill())
	first.wait(t, 10*time.Second)
	began := time.Now()
	again := serving(t, socketPath(t), args...)
	assert.Contains(t, again.stderr.String(), "host is still alive")
	assert.Less(t, time.Since(began), 10*time.Second)
	again.stop(t, syscall.SIGTERM)

	// A clean stop releases the lease at once.
	began = time.Now()
	last := serving(t, socketPath(t), args...)
	assert.NotContains(t, last.stderr.String(), "host is still alive")
	assert.Less(t, time.Since(began), 5*time.Second)
	last.stop(t, syscall.SIGTERM)
}

// TestHostAliveElsewhereFailsAfterTheTTL: a daemon of a host that another
// data root's daemon holds alive gives up once the TTL and a few seconds
// have passed.
func TestHostAliveElsewhereFailsAfterTheTTL(t *testing.T) {
	c := etcdtest.Start(t)
	store := etcdAddress(c, "elsewhere")
	// The daemon holding the host keeps a long lease, so that a loaded
	// machine never lets it expire while the other waits.
	held := serving(t, socketPath(t), "--root", filepath.Join(t.TempDir(), "r1"), "--store", store, "--host", "A", "--host-ttl", "60s")
	began := time.Now()
	d := start(t, socketPath(t), "--root", filepath.Join(t.TempDir(), "r2"), "--store", store, "--host", "A", "--host-ttl", "1s")
	assert.Equal(t, 1, d.wait(t, 30*time.Second))
	assert.GreaterOrEqual(t, time.Since(began), 5*time.Second)
	lines := strings.Split(strings.TrimSpace(d.stderr.String()), "\n")
	assert.Contains(t, lines[len(lines)-1], storage.ErrHostAlive.Error())
	held.stop(t, syscall.SIGTERM)
}

// TestExpiredHostLeaseStopsTheDaemon: once the host's lease is gone (here
// revoked, as etcd does when keep-alives stop arriving), the store refuses
// every write; the first refused call stops the daemon with exit code 1,
// so that a supervisor starts a new one with a new lease.
func TestExpiredHostLeaseStopsTheDaemon(t *testing.T) {
	c := etcdtest.Start(t)
	socket := socketPath(t)
	d := serving(t, socket, "--root", filepath.Join(t.TempDir(), "root"), "--store", etcdAddress(c, "expiry"), "--host", "A", "--host-ttl", "1s")
	cl := client(t, socket)
	ctx := context.Background()
	_, err := cl.Prepare(ctx, "before", "")
	require.NoError(t, err)

	cli, err := clientv3.New(c.ClientConfig())
	require.NoError(t, err)
	defer cli.Close()
	// The cluster is the test's own: its one lease is the daemon's.
	leases, err := cli.Leases(ctx)
	require.NoError(t, err)
	require.Len(t, leases.Leases, 1, "the daemon's lease")
	_, err = cli.Revoke(ctx, leases.Leases[0].ID)
	require.NoError(t, err)

	eventually := time.Now().Add(10 * time.Second)
	for {
		_, err = cl.Prepare(ctx, fmt.Sprintf("after-%d", time.Now().UnixNano()), "")
		if err != nil || time.Now().After(eventually) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	require.Error(t, err, "a write after the lease was revoked")
	assert.Equal(t, 1, d.wait(t, 30*time.Second), "exit code; stderr:\n%s", d.stderr)
	assert.Contains(t, d.stderr.String(), "the host's lease expired")
	assert.NoFileExists(t, socket)
}
