//go:build linux

package powercut_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/crashload"
	"github.com/snapmeta/storage/internal/lossyfs"
)

// Durability of the etcd engine under power loss. A 3-member etcd cluster
// runs in three child processes (this test binary, re-executed), each
// member's data directory on its own lossy filesystem. The parent serves
// the mounts and must therefore not run a member itself: etcd's bbolt
// backend mmaps its database, and a page fault on a mount served by the
// faulting process deadlocks it (docs/notes.md). A fourth child writes
// internal/crashload's workload through storage.NewEtcdStore, logging each
// acknowledged transaction on the real disk.
//
// Each cycle starts a writer and then cuts power either to one member while
// the writer goes on (SIGKILL the member, unmount its filesystem, drop
// everything it did not fsync, mount, restart the member), or to all three
// at once (the writer is killed first: with no member left it could only
// fail). After the cycle, once every member answers a linearizable read,
// the parent demands that every acknowledged transaction is there, every
// other one entirely or not at all, and that storage.Check passes. The
// members run with etcd's default fsync of the WAL: etcd acknowledges a
// write once a majority has it on disk, and that is what is tested.

const (
	// etcdCutMemberEnv holds the member's index; set, it makes
	// TestEtcdPowerCutMember run. The other variables describe the member.
	etcdCutMemberEnv  = "SNAPMETA_ETCDCUT_MEMBER"
	etcdCutDirEnv     = "SNAPMETA_ETCDCUT_DIR"
	etcdCutClusterEnv = "SNAPMETA_ETCDCUT_CLUSTER"
	etcdCutClientEnv  = "SNAPMETA_ETCDCUT_CLIENT"
	etcdCutPeerEnv    = "SNAPMETA_ETCDCUT_PEER"
	etcdCutTokenEnv   = "SNAPMETA_ETCDCUT_TOKEN"
	// etcdCutWriterEnv holds the client endpoints, comma-separated; set, it
	// makes TestEtcdPowerCutWriter run (with cutLogEnv, cutCycleEnv and
	// cutSeedEnv as for the bbolt child).
	etcdCutWriterEnv = "SNAPMETA_ETCDCUT_WRITER"

	// etcdCutStopped is what a member prints once stopped by SIGTERM.
	etcdCutStopped = "SNAPMETA-ETCDCUT-MEMBER-STOPPED"

	etcdCutMembers = 3
	etcdCutRoot    = "powercut"
	// etcdCutMemberLimit stops a member that nobody killed (its parent
	// died), so that no etcd outlives the test by long.
	etcdCutMemberLimit = 2 * time.Minute
	// etcdCutHealthy bounds the wait for the cluster after a restart.
	etcdCutHealthy = 30 * time.Second
	// The raft timings of etcdtest: short, yet no spurious elections under
	// the race detector on two cores.
	etcdCutTick     = 50 * time.Millisecond
	etcdCutElection = 500 * time.Millisecond
)

// TestEtcdPowerCutMember is a member of TestEtcdPowerCut's cluster: it
// runs until it is killed.
func TestEtcdPowerCutMember(t *testing.T) {
	idx := os.Getenv(etcdCutMemberEnv)
	if idx == "" {
		t.Skip("a member of TestEtcdPowerCut's cluster, which re-executes the test binary with " + etcdCutMemberEnv + " set; nothing to do alone")
	}
	parse := func(env string) url.URL {
		u, err := url.Parse(os.Getenv(env))
		require.NoError(t, err, env)
		return *u
	}
	cfg := embed.NewConfig()
	cfg.Name = "m" + idx
	cfg.Dir = os.Getenv(etcdCutDirEnv)
	cfg.ListenClientUrls = []url.URL{parse(etcdCutClientEnv)}
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	cfg.ListenPeerUrls = []url.URL{parse(etcdCutPeerEnv)}
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	// Ignored once the data directory holds a WAL, so a restart passes the
	// same values.
	cfg.InitialCluster = os.Getenv(etcdCutClusterEnv)
	cfg.InitialClusterToken = os.Getenv(etcdCutTokenEnv)
	cfg.ClusterState = embed.ClusterStateFlagNew
	cfg.TickMs = uint(etcdCutTick / time.Millisecond)
	cfg.ElectionMs = uint(etcdCutElection / time.Millisecond)
	cfg.EnableGRPCGateway = false
	// Errors only, on stderr, which the parent shows if the test fails.
	cfg.LogLevel = "error"
	// The point of the test: etcd's default, a WAL fsynced before a write
	// is acknowledged. etcdtest turns it off for speed; here it must stay.
	require.False(t, cfg.UnsafeNoFsync, "the power-cut test needs etcd to fsync")
	e, err := embed.StartEtcd(cfg)
	require.NoError(t, err, "starting member %s", idx)
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	fmt.Println(crashload.Ready)
	select {
	case <-term:
		// A graceful stop, for the end of the bootstrap: then wait for
		// the SIGKILL that the parent's Kill expects.
		e.Close()
		fmt.Println(etcdCutStopped)
		time.Sleep(etcdCutMemberLimit)
		return
	case err := <-e.Err():
		t.Errorf("crash child: member %s failed: %v", idx, err)
	case <-e.Server.StopNotify():
		t.Errorf("crash child: member %s stopped", idx)
	case <-time.After(etcdCutMemberLimit):
		t.Logf("member %s not killed within %v", idx, etcdCutMemberLimit)
	}
	e.Close()
}

// TestEtcdPowerCutWriter is TestEtcdPowerCut's writer: crashload's
// workload through the etcd engine, until it is killed.
func TestEtcdPowerCutWriter(t *testing.T) {
	endpoints := os.Getenv(etcdCutWriterEnv)
	if endpoints == "" {
		t.Skip("the writer of TestEtcdPowerCut, which re-executes the test binary with " + etcdCutWriterEnv + " set; nothing to do alone")
	}
	cycle, err := strconv.Atoi(os.Getenv(cutCycleEnv))
	require.NoError(t, err, cutCycleEnv)
	seed, err := strconv.ParseUint(os.Getenv(cutSeedEnv), 10, 64)
	require.NoError(t, err, cutSeedEnv)
	ms, err := storage.NewEtcdStore(etcdCutRoot, &clientv3.Config{
		Endpoints:   strings.Split(endpoints, ","),
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	}, storage.WithRequestTimeout(5*time.Second))
	require.NoError(t, err)
	defer func() { assert.NoError(t, ms.Close()) }()
	// A member killed under a request, or a leader lost with it, fails
	// that request with an error of unknown outcome: the transaction may
	// or may not have been applied. Anything else is a failure.
	uncertain := func(err error) bool {
		return errdefs.IsUnavailable(err) || errors.Is(err, context.DeadlineExceeded)
	}
	crashload.WriteTolerating(t, ms, os.Getenv(cutLogEnv), cycle, seed, uncertain)
}

// etcdCutMember is one member as the parent sees it.
type etcdCutMember struct {
	idx          int
	fs           *lossyfs.FS
	mnt          string
	client, peer url.URL
	proc         *crashload.Child // nil while down
	mounted      bool
}

func TestEtcdPowerCut(t *testing.T) {
	lossyfs.SkipUnlessAvailable(t)
	began := time.Now()
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(cutSeedEnv); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		require.NoError(t, err, cutSeedEnv)
		seed = n
	}
	t.Logf("%s=%d", cutSeedEnv, seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	// Ports: found free by listening on 127.0.0.1:0, all held until the
	// last is found so that they differ.
	var ports []int
	var listeners []net.Listener
	for range 2 * etcdCutMembers {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range listeners {
		require.NoError(t, l.Close())
	}
	local := func(port int) url.URL {
		return url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
	}
	var (
		members   []*etcdCutMember
		peers     []string
		endpoints []string
		stats     crashload.Stats // of the writers
		memStats  crashload.Stats // of the members (startup times)
	)
	for i := range etcdCutMembers {
		l, err := lossyfs.New(t.TempDir())
		require.NoError(t, err)
		// The data directory itself is made on the "disk" (the backing
		// directory), as an installer would: what is tested is etcd's
		// own writes in it.
		require.NoError(t, os.Mkdir(filepath.Join(l.Backing(), "etcd"), 0o700))
		m := &etcdCutMember{idx: i, fs: l, mnt: t.TempDir(), client: local(ports[2*i]), peer: local(ports[2*i+1])}
		members = append(members, m)
		peers = append(peers, fmt.Sprintf("m%d=%s", i, m.peer.String()))
		endpoints = append(endpoints, m.client.String())
	}
	t.Cleanup(func() {
		// Members first: a mount cannot go while a member holds its files.
		for _, m := range members {
			if m.proc != nil {
				m.proc.Kill(t)
			}
		}
		for _, m := range members {
			if m.mounted {
				assert.NoError(t, m.fs.Unmount())
			}
		}
	})
	token := fmt.Sprintf("powercut-%d", seed)
	// start starts member m on its mount, or, onDisk, on the backing
	// directory itself.
	// It does not wait for the member: see WaitReady.
	startOn := func(m *etcdCutMember, onDisk bool) {
		dir := filepath.Join(m.mnt, "etcd")
		if onDisk {
			dir = filepath.Join(m.fs.Backing(), "etcd")
		} else if !m.mounted {
			require.NoError(t, m.fs.Mount(m.mnt))
			m.mounted = true
		}
		m.proc = crashload.LaunchChild(t, "TestEtcdPowerCutMember", []string{
			etcdCutMemberEnv + "=" + strconv.Itoa(m.idx),
			etcdCutDirEnv + "=" + dir,
			etcdCutClusterEnv + "=" + strings.Join(peers, ","),
			etcdCutClientEnv + "=" + m.client.String(),
			etcdCutPeerEnv + "=" + m.peer.String(),
			etcdCutTokenEnv + "=" + token,
		}, -1, &memStats)
	}
	start := func(m *etcdCutMember) { startOn(m, false) }
	// The members start together: each takes a second or two under the
	// race detector.
	ready := func() {
		for _, m := range members {
			if m.proc != nil {
				m.proc.WaitReady(t)
			}
		}
	}
	var (
		cutsLosing int
		cuts       int
	)
	// down kills member m and cuts its power: its filesystem loses what
	// etcd did not fsync. No write is torn: lossyfs tears at any byte,
	// while etcd's WAL, like real disks, counts on 512-byte sectors being
	// written whole (a torn tail is recognised by a sector of zeros), so a
	// byte-level tear can leave a WAL etcd refuses to open, a failure of
	// the model, not of etcd.
	down := func(m *etcdCutMember) lossyfs.CutResult {
		m.proc.Kill(t)
		m.proc = nil
		m.mounted = false
		require.NoError(t, m.fs.Unmount())
		cut, err := m.fs.Cut(nil)
		require.NoError(t, err, "cutting member %d", m.idx)
		cuts++
		if cut.DroppedWrites > 0 || cut.DroppedDirOps > 0 {
			cutsLosing++
		}
		return cut
	}
	// One client per member: the cluster is healthy when each of them
	// answers a linearizable read, which needs a leader and the member
	// caught up with it.
	newClient := func(eps ...string) *clientv3.Client {
		cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		require.NoError(t, err)
		t.Cleanup(func() { _ = cli.Close() })
		return cli
	}
	var probes []*clientv3.Client
	for _, ep := range endpoints {
		probes = append(probes, newClient(ep))
	}
	waitHealthy := func(what string) time.Duration {
		t0 := time.Now()
		deadline := t0.Add(etcdCutHealthy)
		for i := 0; i < len(probes); {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := probes[i].Get(ctx, "health")
			cancel()
			if err == nil {
				i++
				continue
			}
			if time.Now().After(deadline) {
				var out strings.Builder
				for _, m := range members {
					if m.proc != nil {
						fmt.Fprintf(&out, "--- member %d:\n%s\n", m.idx, m.proc.Output())
					}
				}
				t.Fatalf("%s: member %d not healthy within %v: %v\n%s", what, i, etcdCutHealthy, err, out.String())
			}
			time.Sleep(etcdCutTick)
		}
		return time.Since(t0)
	}
	// The cluster is created on the disks (the backing directories), not
	// through the mounts: etcd makes its first WAL file in wal.tmp, fsyncs
	// the file, renames the directory to wal and fsyncs member/, but never
	// fsyncs wal/ itself, so by the strict rules lossyfs applies the WAL
	// file's name is not durable until the WAL's first segment switch
	// (64 MiB later; ext4 and XFS do persist it with the file). Starting on
	// the disk is a cluster that ran long enough for its filesystem to
	// commit that: the cuts test etcd's steady state. (lossyfs could not
	// undo that creation anyway: it undoes by path, and the path is gone
	// with the durable rename; see docs/notes.md.)
	for _, m := range members {
		startOn(m, true)
	}
	ready()
	waitHealthy("the new cluster, on the disks")
	// Stopped gracefully: a SIGKILL in the middle of a WAL write(2) may
	// leave part of a record on the disk, and here no cut removes it (a
	// trial run saw etcd refuse such a WAL: "walpb: crc mismatch").
	for _, m := range members {
		require.NoError(t, m.proc.Signal(syscall.SIGTERM))
	}
	for _, m := range members {
		deadline := time.Now().Add(etcdCutHealthy)
		for !strings.Contains(m.proc.Output(), etcdCutStopped) {
			require.True(t, time.Now().Before(deadline), "member %d did not stop on SIGTERM:\n%s", m.idx, m.proc.Output())
			time.Sleep(etcdCutTick)
		}
		m.proc.Kill(t)
		m.proc = nil
	}
	for _, m := range members {
		start(m)
	}
	ready()
	waitHealthy("the cluster on the lossy filesystems")

	// The parent reads through its own client, never through a mount.
	ms, err := storage.NewEtcdStoreFromClient(newClient(endpoints...), etcdCutRoot)
	require.NoError(t, err)
	defer func() { assert.NoError(t, ms.Close()) }()

	// Cuts of one member (each member in turn), then of all three, twice.
	scenarios := []int{0, 1, 2, -1, 0, -1} // a member's index; -1: all
	logs := t.TempDir()
	var (
		model       = map[string]*crashload.State{}
		offsets     = map[string]int64{}
		everAborted = map[string]bool{}
		recovery    time.Duration
	)
	for cycle, victim := range scenarios {
		writer := crashload.StartChild(t, "TestEtcdPowerCutWriter", []string{
			etcdCutWriterEnv + "=" + strings.Join(endpoints, ","),
			cutLogEnv + "=" + logs,
			cutCycleEnv + "=" + strconv.Itoa(cycle),
			cutSeedEnv + "=" + strconv.FormatUint(rng.Uint64(), 10),
		}, cycle, &stats)
		runFor := func() time.Duration {
			return crashload.MinRun + time.Duration(rng.Int64N(int64(crashload.MaxRun-crashload.MinRun)+1))
		}
		time.Sleep(runFor())
		var what string
		if victim >= 0 {
			m := members[victim]
			cut := down(m)
			start(m)
			m.proc.WaitReady(t)
			// The writer went on with two members, and goes on with the
			// third catching up.
			time.Sleep(runFor())
			writer.Kill(t)
			what = fmt.Sprintf("cycle %d (power cut to member %d while writing: dropped %d writes, %d directory changes)",
				cycle, victim, cut.DroppedWrites, cut.DroppedDirOps)
		} else {
			writer.Kill(t)
			for _, m := range members {
				m.proc.Kill(t)
			}
			var dropped, dirOps int
			for _, m := range members {
				cut := down(m)
				dropped += cut.DroppedWrites
				dirOps += cut.DroppedDirOps
			}
			for _, m := range members {
				start(m)
			}
			what = fmt.Sprintf("cycle %d (power cut to all members: dropped %d writes, %d directory changes)", cycle, dropped, dirOps)
		}
		ready()
		recovery += waitHealthy(what)

		intents, torn := crashload.ReadLog(t, filepath.Join(logs, crashload.IntentsLog), offsets)
		stats.Torn += torn
		acks, torn := crashload.ReadLog(t, filepath.Join(logs, crashload.AckedLog), offsets)
		stats.Torn += torn

		t0 := time.Now()
		ctx := context.Background()
		problems, err := storage.Check(ctx, ms)
		require.NoError(t, err, what)
		require.Empty(t, problems, "%s: Check", what)
		state, err := crashload.Read(ctx, ms)
		require.NoError(t, err, what)
		v := crashload.Verify(cycle, model, intents, acks, state, everAborted, &stats)
		stats.Verifying += time.Since(t0)
		require.True(t, v.OK(), "%s: the store does not match the transactions:\n%s", what, strings.Join(v.Problems, "\n"))
		t.Logf("%s: %d acknowledged transactions checked, %d snapshots", what, len(acks), len(state))
		model = state
		stats.MaxSnaps = max(stats.MaxSnaps, len(state))
	}

	var fs lossyfs.Stats
	for _, m := range members {
		s := m.fs.Stats()
		fs.Writes += s.Writes
		fs.Fsyncs += s.Fsyncs
		fs.DirFsyncs += s.DirFsyncs
		fs.DroppedWrites += s.DroppedWrites
		fs.DroppedBytes += s.DroppedBytes
		fs.DroppedDirOps += s.DroppedDirOps
	}
	assert.GreaterOrEqual(t, stats.Acked, len(scenarios), "too few acknowledged transactions to prove anything")
	assert.Positive(t, fs.DroppedWrites, "no cut dropped a write: the test would prove little")
	t.Logf("%d power cuts in %d cycles in %v: %d acknowledged transactions, all present; %d in flight at a cut or failed with an unknown outcome and visible entirely, %d not visible at all; %d failed on purpose, none visible; up to %d snapshots",
		cuts, len(scenarios), time.Since(began).Round(time.Millisecond), stats.Acked, stats.Extra, stats.Lost, stats.Aborted, stats.MaxSnaps)
	t.Logf("the filesystems saw %d writes, %d fsyncs, %d directory fsyncs; the cuts dropped %d unsynced writes (%d bytes) and %d directory changes, in %d of %d cuts",
		fs.Writes, fs.Fsyncs, fs.DirFsyncs, fs.DroppedWrites, fs.DroppedBytes, fs.DroppedDirOps, cutsLosing, cuts)
	t.Logf("member startups %v (summed over members, which start together), writer startup %v, writing %v, waiting for a healthy cluster %v, verification %v in all",
		memStats.Startup.Round(time.Millisecond), stats.Startup.Round(time.Millisecond), stats.Running.Round(time.Millisecond),
		recovery.Round(time.Millisecond), stats.Verifying.Round(time.Millisecond))
}
