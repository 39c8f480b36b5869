package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

// raceBuild is set by race_test.go when the tests run with -race; the daemon
// is then built with the race detector too, and a race in it fails the test
// (its exit code is raceExitCode).
var raceBuild bool

const raceExitCode = 66

// binary is the daemon built once by TestMain.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "snapmeta-snapshotter-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "snapmeta-snapshotter")
	args := []string{"build", "-o", binary}
	if raceBuild {
		args = append(args, "-race")
	}
	if out, err := exec.Command("go", append(args, ".")...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(etcdtest.GoleakIgnores...); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// syncBuffer collects a process's output while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// proc is one run of the daemon.
type proc struct {
	cmd            *exec.Cmd
	socket         string
	stdout, stderr *syncBuffer
	exited         chan struct{} // closed once the process has exited
	code           int           // exit code, valid once exited is closed
}

// socketPath returns a socket path in a new short directory under /tmp
// (unix socket paths are limited to 107 bytes), removed after the test.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "sm")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "snapshotter.sock")
}

// start starts the daemon with args; it is killed when the test ends.
func start(t *testing.T, socket string, args ...string) *proc {
	t.Helper()
	p := &proc{socket: socket, stdout: &syncBuffer{}, stderr: &syncBuffer{}, exited: make(chan struct{})}
	if socket != "" {
		args = append([]string{"--socket", socket}, args...)
	}
	p.cmd = exec.Command(binary, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	p.cmd.Env = append(os.Environ(), fmt.Sprintf("GORACE=halt_on_error=1 exitcode=%d", raceExitCode))
	require.NoError(t, p.cmd.Start())
	go func() {
		err := p.cmd.Wait()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			p.code = ee.ExitCode()
		case err != nil:
			p.code = -1
		}
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if p.code == raceExitCode {
			t.Errorf("data race in the daemon:\n%s", p.stderr)
		}
	})
	return p
}

// serving starts the daemon and waits until it accepts connections.
func serving(t *testing.T, socket string, args ...string) *proc {
	t.Helper()
	p := start(t, socket, args...)
	p.waitServing(t)
	return p
}

// waitServing waits (at most 30 s) until the socket accepts connections.
func (p *proc) waitServing(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-p.exited:
			t.Fatalf("daemon exited with %d before serving:\n%s", p.code, p.stderr)
		default:
		}
		if c, err := net.DialTimeout("unix", p.socket, time.Second); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not serving after 30s:\n%s", p.stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// wait waits at most timeout for the daemon to exit and returns its code.
func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.exited:
		return p.code
	case <-time.After(timeout):
		t.Fatalf("daemon still running after %v:\n%s", timeout, p.stderr)
		return 0
	}
}

// stop sends sig and waits (at most 20 s) for a clean exit.
func (p *proc) stop(t *testing.T, sig os.Signal) {
	t.Helper()
	require.NoError(t, p.cmd.Process.Signal(sig))
	require.Equal(t, 0, p.wait(t, 20*time.Second), "exit code; stderr:\n%s", p.stderr)
	assert.NoFileExists(t, p.socket, "socket left behind")
	assert.Contains(t, p.stderr.String(), "msg=stopped")
}

// waitLog waits (at most 30 s) until the daemon's stderr contains s.
func (p *proc) waitLog(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(p.stderr.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the daemon's log after 30s:\n%s", s, p.stderr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// client returns containerd's proxy snapshotter talking to socket, as
// containerd's proxy plugin does.
func client(t *testing.T, socket string) snapshots.Snapshotter {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "snapmeta")
}

// engine is a store the daemon runs on: the --store address, and a way to
// open the same store in the test once the daemon has stopped.
type engine struct {
	name string
	// setup returns the daemon's store flags for root, and an opener of
	// the same store for the test.
	setup func(t *testing.T, root string) (flags []string, open func() storage.MetaStore)
}

var engines = []engine{
	{"Bolt", func(t *testing.T, root string) ([]string, func() storage.MetaStore) {
		// The default store: <root>/metadata.db.
		return nil, func() storage.MetaStore {
			ms, err := storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
			require.NoError(t, err)
			t.Cleanup(func() { ms.Close() })
			return ms
		}
	}},
	{"Etcd", func(t *testing.T, root string) ([]string, func() storage.MetaStore) {
		c := etcdtest.Start(t)
		return []string{"--store", etcdAddress(c, "daemon-test")}, func() storage.MetaStore {
			cfg := c.ClientConfig()
			ms, err := storage.NewEtcdStore("daemon-test", &cfg)
			require.NoError(t, err)
			t.Cleanup(func() { ms.Close() })
			return ms
		}
	}},
}

// etcdAddress is the store address of root on c.
func etcdAddress(c *etcdtest.Cluster, root string) string {
	var hosts []string
	for _, ep := range c.Endpoints() {
		hosts = append(hosts, strings.TrimPrefix(ep, "http://"))
	}
	return "etcd://" + strings.Join(hosts, ",") + "/" + root
}

// TestServe drives the daemon through containerd's own proxy client, on
// each engine: what it serves is what the store holds afterwards, and a
// restarted daemon serves it again.
func TestServe(t *testing.T) {
	for _, e := range engines {
		t.Run(e.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			root := filepath.Join(t.TempDir(), "root")
			socket := socketPath(t)
			flags, open := e.setup(t, root)
			d := serving(t, socket, append([]string{"--root", root}, flags...)...)
			sn := client(t, socket)

			mounts, err := sn.Prepare(ctx, "layer-1", "")
			require.NoError(t, err)
			require.Len(t, mounts, 1)
			assert.Equal(t, "bind", mounts[0].Type)
			assert.Contains(t, mounts[0].Options, "rw")
			require.NoError(t, os.WriteFile(filepath.Join(mounts[0].Source, "hello"), []byte("hello\n"), 0o644))
			require.NoError(t, sn.Commit(ctx, "base", "layer-1", snapshots.WithLabels(map[string]string{"test": "yes"})))

			info, err := sn.Stat(ctx, "base")
			require.NoError(t, err)
			assert.Equal(t, snapshots.KindCommitted, info.Kind)
			assert.Equal(t, "yes", info.Labels["test"])
			usage, err := sn.Usage(ctx, "base")
			require.NoError(t, err)
			assert.Positive(t, usage.Size)

			child, err := sn.Prepare(ctx, "work", "base")
			require.NoError(t, err)
			got, err := os.ReadFile(filepath.Join(child[0].Source, "hello"))
			require.NoError(t, err)
			assert.Equal(t, "hello\n", string(got), "the child copies its parent")
			view, err := sn.View(ctx, "look", "base")
			require.NoError(t, err)
			assert.Contains(t, view[0].Options, "ro")
			_, err = sn.Update(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"test": "changed"}}, "labels.test")
			require.NoError(t, err)

			var names []string
			require.NoError(t, sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
				names = append(names, i.Name)
				return nil
			}))
			assert.ElementsMatch(t, []string{"base", "work", "look"}, names)
			require.NoError(t, sn.Remove(ctx, "look"))
			_, err = sn.Stat(ctx, "look")
			assert.True(t, errdefs.IsNotFound(err), "removed snapshot: %v", err)
			// Error classes cross the wire: containerd relies on them.
			_, err = sn.Prepare(ctx, "work", "base")
			assert.True(t, errdefs.IsAlreadyExists(err), "duplicate key: %v", err)
			_, err = sn.Prepare(ctx, "orphan", "nope")
			assert.Error(t, err)

			d.stop(t, syscall.SIGTERM)

			// The store holds what was served, and is sound.
			ms := open()
			require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				_, info, _, err := storage.GetInfo(ctx, "base")
				require.NoError(t, err)
				assert.Equal(t, "changed", info.Labels["test"])
				s, err := storage.GetSnapshot(ctx, "work")
				require.NoError(t, err)
				assert.Equal(t, filepath.Join(root, "snapshots", s.ID), child[0].Source)
				_, _, _, err = storage.GetInfo(ctx, "look")
				assert.True(t, errdefs.IsNotFound(err))
				return nil
			}))
			problems, err := storage.Check(ctx, ms)
			require.NoError(t, err)
			assert.Empty(t, problems)
			require.NoError(t, ms.Close())

			// Served again after a restart.
			d = serving(t, socket, append([]string{"--root", root}, flags...)...)
			sn = client(t, socket)
			info, err = sn.Stat(ctx, "base")
			require.NoError(t, err)
			assert.Equal(t, "changed", info.Labels["test"])
			d.stop(t, syscall.SIGINT)
		})
	}
}

// TestSignals: SIGTERM and SIGINT both stop the daemon cleanly and remove
// the socket.
func TestSignals(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			t.Parallel()
			socket := socketPath(t)
			d := serving(t, socket, "--root", t.TempDir())
			d.stop(t, sig)
			assert.Contains(t, d.stderr.String(), "signal="+sig.String())
		})
	}
}

// TestShutdownWithCallUnderWay holds a call in the daemon (its etcd is
// stopped, so the call waits for it) while the daemon is told to stop.
func TestShutdownWithCallUnderWay(t *testing.T) {
	for _, tc := range []struct {
		name string
		// timeout is --shutdown-timeout.
		timeout string
		// act runs after SIGTERM, while the call is under way.
		act func(t *testing.T, d *proc, c *etcdtest.Cluster)
		// wantCall and wantCode: the call's outcome and the exit code.
		wantCallOK bool
		wantCode   int
		wantLog    string
	}{
		{
			name:    "call finishes",
			timeout: "60s",
			act: func(t *testing.T, d *proc, c *etcdtest.Cluster) {
				// No new connections once shutting down.
				_, err := net.DialTimeout("unix", d.socket, time.Second)
				assert.Error(t, err, "the socket still accepts")
				require.NoError(t, c.Restart(0))
			},
			wantCallOK: true,
			wantLog:    "msg=stopped",
		},
		{
			name:     "call cancelled after the shutdown timeout",
			timeout:  "1s",
			act:      func(*testing.T, *proc, *etcdtest.Cluster) {},
			wantLog:  "cancelling them",
			wantCode: 0,
		},
		{
			name:    "second signal exits at once",
			timeout: "60s",
			act: func(t *testing.T, d *proc, _ *etcdtest.Cluster) {
				require.NoError(t, d.cmd.Process.Signal(syscall.SIGINT))
			},
			wantCode: 1,
			wantLog:  "second signal",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := etcdtest.Start(t)
			socket := socketPath(t)
			d := serving(t, socket, "--root", t.TempDir(), "--store", etcdAddress(c, "x"),
				"--shutdown-timeout", tc.timeout, "--log-level", "debug")
			sn := client(t, socket)
			_, err := sn.Prepare(context.Background(), "warm-up", "")
			require.NoError(t, err)

			c.Stop(0)
			callErr := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				_, err := sn.Prepare(ctx, "slow", "")
				callErr <- err
			}()
			d.waitLog(t, "call=Prepare")
			// The warm-up logged a Prepare too; wait for the second.
			deadline := time.Now().Add(30 * time.Second)
			for strings.Count(d.stderr.String(), `msg="call started"`) < 2 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			require.NoError(t, d.cmd.Process.Signal(syscall.SIGTERM))
			d.waitLog(t, "shutting down")
			began := time.Now()
			tc.act(t, d, c)

			assert.Equal(t, tc.wantCode, d.wait(t, 30*time.Second), "exit code; stderr:\n%s", d.stderr)
			assert.Less(t, time.Since(began), 20*time.Second)
			assert.Contains(t, d.stderr.String(), tc.wantLog)
			assert.NoFileExists(t, socket)
			select {
			case err := <-callErr:
				if tc.wantCallOK {
					assert.NoError(t, err, "the call under way finishes")
				} else {
					assert.Error(t, err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the call did not return")
			}
		})
	}
}

// TestStartupErrors: a daemon that cannot start says why in one line on
// stderr, exits non-zero and leaves no socket.
func TestStartupErrors(t *testing.T) {
	lockedRoot := t.TempDir()
	held, err := storage.NewBoltMetaStore(filepath.Join(lockedRoot, "metadata.db"))
	require.NoError(t, err)
	// Cleanup, not defer: the subtests run in parallel, after this
	// function has returned.
	t.Cleanup(func() { held.Close() })
	otherDriver := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(otherDriver, "driver"), []byte("overlay\n"), 0o600))

	long := "/tmp/" + strings.Repeat("s", 110)
	for _, tc := range []struct {
		name     string
		args     []string // after --socket
		noSocket bool
		code     int
		want     string
	}{
		{"unknown scheme", []string{"--root", "R", "--store", "ftp://x/y"}, false, 2, `unknown store address scheme "ftp"`},
		{"etcd address without root", []string{"--root", "R", "--store", "etcd://127.0.0.1:1"}, false, 2, "has no root"},
		{"locked bbolt file", []string{"--root", lockedRoot}, false, 1, "metadata.db is locked by another process"},
		{"store is a directory", []string{"--root", "R", "--store", "bolt://" + lockedRoot}, false, 1, "is a directory, not a bbolt file"},
		{"etcd unreachable", []string{"--root", "R", "--store", "etcd://127.0.0.1:1/x", "--dial-timeout", "500ms"}, false, 1, "cannot open the store: etcd 127.0.0.1:1 did not answer within 500ms"},
		{"etcd password missing", []string{"--root", "R", "--store", "etcd://127.0.0.1:1/x", "--user", "bob"}, false, 2, `no password for etcd user "bob"`},
		{"root of another driver", []string{"--root", otherDriver}, false, 1, `belongs to driver "overlay", not "native"`},
		{"no socket", []string{"--root", "R"}, true, 2, "--socket is required"},
		{"no root", nil, false, 2, "--root is required"},
		{"unknown driver", []string{"--root", "R", "--driver", "zfs"}, false, 2, `unknown driver "zfs" (want one of: native, overlay)`},
		{"bad log level", []string{"--root", "R", "--log-level", "loud"}, false, 2, `--log-level "loud"`},
		{"bad log format", []string{"--root", "R", "--log-format", "xml"}, false, 2, `--log-format "xml": want text or json`},
		{"socket path too long", []string{"--root", "R", "--socket", long}, true, 2, "a unix socket path has at most 107"},
		{"unknown flag", []string{"--root", "R", "--nope"}, false, 2, "unknown flag: --nope"},
		{"argument", []string{"--root", "R", "extra"}, false, 2, `unexpected argument "extra"`},
		{"host on bbolt", []string{"--root", "R", "--host", "a"}, false, 2, "--host a needs an etcd store"},
		{"bad host", []string{"--root", "R", "--store", "etcd://127.0.0.1:1/x", "--host", "a/b"}, false, 2, `--host "a/b": a host identity is`},
		{"host TTL under a second", []string{"--root", "R", "--store", "etcd://127.0.0.1:1/x", "--host", "a", "--host-ttl", "500ms"}, false, 2, "--host-ttl 500ms is under a second"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			socket := socketPath(t)
			args := tc.args
			for i, a := range args {
				if a == "R" {
					args[i] = filepath.Join(t.TempDir(), "root")
				}
			}
			if tc.noSocket {
				socket = ""
			}
			began := time.Now()
			d := start(t, socket, args...)
			assert.Equal(t, tc.code, d.wait(t, 30*time.Second))
			assert.Less(t, time.Since(began), 15*time.Second)
			lines := strings.Split(strings.TrimSuffix(d.stderr.String(), "\n"), "\n")
			require.Len(t, lines, 1, "stderr:\n%s", d.stderr)
			assert.True(t, strings.HasPrefix(lines[0], "snapmeta-snapshotter: "), lines[0])
			assert.Contains(t, lines[0], tc.want)
			if socket != "" {
				assert.NoFileExists(t, socket)
			}
		})
	}
}

// TestFailedStartBindsNoDriver: a start that fails before the driver is
// made (here a store that does not answer) leaves the root to any driver;
// a start that succeeds binds it to its driver.
func TestFailedStartBindsNoDriver(t *testing.T) {
	root := filepath.Join(t.TempDir(), "root")
	failed := start(t, socketPath(t), "--root", root, "--driver", "overlay", "--store", "etcd://127.0.0.1:1/x", "--dial-timeout", "300ms")
	require.Equal(t, 1, failed.wait(t, 30*time.Second), "stderr:\n%s", failed.stderr)
	assert.NoFileExists(t, filepath.Join(root, "driver"))

	d := serving(t, socketPath(t), "--root", root, "--driver", "native")
	d.stop(t, syscall.SIGTERM)
	got, err := os.ReadFile(filepath.Join(root, "driver"))
	require.NoError(t, err)
	assert.Equal(t, "native\n", string(got))

	refused := start(t, socketPath(t), "--root", root, "--driver", "overlay")
	assert.Equal(t, 1, refused.wait(t, 30*time.Second))
	assert.Contains(t, refused.stderr.String(), `belongs to driver "native", not "overlay"`)
}

// TestSocketTaken: the daemon refuses a socket that something serves, and
// anything at the path that is not a socket; what is there stays.
func TestSocketTaken(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, socket string)
		want  string
	}{
		{"another daemon", func(t *testing.T, socket string) {
			serving(t, socket, "--root", t.TempDir())
		}, "is in use: another process serves it"},
		{"another listener", func(t *testing.T, socket string) {
			l, err := net.Listen("unix", socket)
			require.NoError(t, err)
			t.Cleanup(func() { l.Close() })
		}, "is in use: another process serves it"},
		{"a regular file", func(t *testing.T, socket string) {
			require.NoError(t, os.WriteFile(socket, []byte("mine"), 0o600))
		}, "exists and is not a socket; refusing to replace it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			socket := socketPath(t)
			tc.setup(t, socket)
			before, err := os.Lstat(socket)
			require.NoError(t, err)
			d := start(t, socket, "--root", t.TempDir())
			assert.Equal(t, 1, d.wait(t, 30*time.Second))
			assert.Contains(t, d.stderr.String(), tc.want)
			after, err := os.Lstat(socket)
			require.NoError(t, err, "the path was removed")
			assert.True(t, os.SameFile(before, after), "the path was replaced")
		})
	}
	t.Run("the data root is another daemon's", func(t *testing.T) {
		t.Parallel()
		// On etcd nothing else would stop a second daemon on the root.
		c := etcdtest.Start(t)
		root := t.TempDir()
		first := serving(t, socketPath(t), "--root", root, "--store", etcdAddress(c, "a"))
		second := start(t, socketPath(t), "--root", root, "--store", etcdAddress(c, "b"))
		assert.Equal(t, 1, second.wait(t, 30*time.Second))
		assert.Contains(t, second.stderr.String(), "data root "+root+" is in use by another snapmeta-snapshotter")
		first.stop(t, syscall.SIGTERM)
	})
	t.Run("the first daemon keeps serving", func(t *testing.T) {
		t.Parallel()
		socket := socketPath(t)
		first := serving(t, socket, "--root", t.TempDir())
		second := start(t, socket, "--root", t.TempDir())
		assert.Equal(t, 1, second.wait(t, 30*time.Second))
		_, err := client(t, socket).Prepare(context.Background(), "a", "")
		assert.NoError(t, err)
		first.stop(t, syscall.SIGTERM)
	})
}

// TestStaleSocket: a socket file nobody serves (a daemon was killed) is
// replaced, and the store a killed daemon held opens again.
func TestStaleSocket(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stale func(t *testing.T, socket, root string)
	}{
		{"left by a closed listener", func(t *testing.T, socket, _ string) {
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
			require.NoError(t, err)
			l.SetUnlinkOnClose(false)
			require.NoError(t, l.Close())
		}},
		{"left by a killed daemon", func(t *testing.T, socket, root string) {
			d := serving(t, socket, "--root", root)
			_, err := client(t, socket).Prepare(context.Background(), "kept", "")
			require.NoError(t, err)
			require.NoError(t, d.cmd.Process.Kill())
			d.wait(t, 20*time.Second)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			socket, root := socketPath(t), t.TempDir()
			tc.stale(t, socket, root)
			fi, err := os.Lstat(socket)
			require.NoError(t, err)
			require.Equal(t, os.ModeSocket, fi.Mode().Type())

			d := serving(t, socket, "--root", root)
			assert.Contains(t, d.stderr.String(), "replacing a stale socket")
			_, err = client(t, socket).Prepare(context.Background(), "new", "")
			assert.NoError(t, err)
			d.stop(t, syscall.SIGTERM)
		})
	}
}

// TestLogFormat: --log-format json writes one JSON object per line.
func TestLogFormat(t *testing.T) {
	for _, tc := range []struct{ format, want string }{
		{"text", `msg=serving`},
		{"json", `"msg":"serving"`},
	} {
		t.Run(tc.format, func(t *testing.T) {
			t.Parallel()
			socket := socketPath(t)
			d := serving(t, socket, "--root", t.TempDir(), "--log-format", tc.format)
			d.waitLog(t, tc.want)
			require.NoError(t, d.cmd.Process.Signal(syscall.SIGTERM))
			require.Equal(t, 0, d.wait(t, 20*time.Second))
			for _, l := range strings.Split(strings.TrimSpace(d.stderr.String()), "\n") {
				if tc.format == "json" {
					assert.True(t, strings.HasPrefix(l, "{") && strings.HasSuffix(l, "}"), "not JSON: %s", l)
				} else {
					assert.Contains(t, l, "level=")
				}
			}
		})
	}
}

func TestVersion(t *testing.T) {
	d := start(t, "", "--version")
	require.Equal(t, 0, d.wait(t, 20*time.Second))
	assert.Regexp(t, `^snapmeta-snapshotter \S+ go1\.\S+\n$`, d.stdout.String())
}

// TestDrivers: every driver of the table makes a snapshotter that serves a
// Prepare and closes its store.
func TestDrivers(t *testing.T) {
	for name, newDriver := range drivers {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			ms, err := storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
			require.NoError(t, err)
			sn, err := newDriver(root, ms)
			require.NoError(t, err)
			mounts, err := sn.Prepare(context.Background(), "a", "")
			require.NoError(t, err)
			assert.NotEmpty(t, mounts)
			assert.IsType(t, []mount.Mount{}, mounts)
			require.NoError(t, sn.Close())
			// The snapshotter closed the store.
			assert.ErrorIs(t, ms.WithTransaction(context.Background(), false, func(context.Context) error { return nil }), storage.ErrClosed)
		})
	}
}
