package storage_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

// benchEtcdChildEnv, set to a directory, makes this test binary an etcd
// server for a parent benchmark (TestMain): one fsyncing member on random
// 127.0.0.1 ports, its client URL written to <dir>/url, stopped when its
// standard input closes (the parent closed it, or died).
const benchEtcdChildEnv = "SNAPMETA_BENCH_ETCD_CHILD"

// runBenchEtcdChild serves as the child process and returns its exit code.
func runBenchEtcdChild(dir string) int {
	c, err := etcdtest.NewCluster(1, etcdtest.WithFsync())
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcd child:", err)
		return 1
	}
	defer c.Close()
	tmp := filepath.Join(dir, "url.tmp")
	if err := os.WriteFile(tmp, []byte(c.Endpoint(0)), 0o600); err != nil {
		fmt.Fprintln(os.Stderr, "etcd child:", err)
		return 1
	}
	if err := os.Rename(tmp, filepath.Join(dir, "url")); err != nil {
		fmt.Fprintln(os.Stderr, "etcd child:", err)
		return 1
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

type etcdChild struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	endpoint string
}

func startEtcdChild() (*etcdChild, error) {
	dir, err := os.MkdirTemp("", "snapmeta-bench-etcd-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir) // the member's data lives in its own temporary directory
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), benchEtcdChildEnv+"="+dir)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &etcdChild{cmd: cmd, stdin: stdin}
	for deadline := time.Now().Add(time.Minute); ; {
		if b, err := os.ReadFile(filepath.Join(dir, "url")); err == nil {
			c.endpoint = string(b)
			return c, nil
		}
		if time.Now().After(deadline) {
			c.stop()
			return nil, errors.New("the etcd child wrote no URL within a minute")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop closes the child's input, so that it stops its member and exits,
// and kills it if it has not within 30 s.
func (c *etcdChild) stop() {
	_ = c.stdin.Close()
	t := time.AfterFunc(30*time.Second, func() { _ = c.cmd.Process.Kill() })
	_ = c.cmd.Wait()
	t.Stop()
}

// rssMiB is the child's resident memory, NaN when unknown.
func (c *etcdChild) rssMiB() float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		return math.NaN()
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			if err != nil {
				return math.NaN()
			}
			return kb / 1024
		}
	}
	return math.NaN()
}

// scaleEtcd is BenchmarkScale's etcd for one size: a child process of its
// own with SNAPMETA_BENCH_ETCD_PROCESS=1, stopped at the cleanup of the
// benchmark that started it, else the benchmarks' in-process server.
type scaleEtcd struct {
	cfg   clientv3.Config
	child *etcdChild // nil in process
}

func newScaleEtcd(b *testing.B) scaleEngine {
	b.Helper()
	if os.Getenv("SNAPMETA_BENCH_ETCD_PROCESS") == "" {
		return &scaleEtcd{cfg: benchEtcdServer(b).ClientConfig()}
	}
	child, err := startEtcdChild()
	require.NoError(b, err)
	b.Cleanup(child.stop)
	return &scaleEtcd{
		cfg:   clientv3.Config{Endpoints: []string{child.endpoint}, DialTimeout: 10 * time.Second, Logger: zap.NewNop()},
		child: child,
	}
}

func (s *scaleEtcd) open(b *testing.B, tag string) storage.MetaStore {
	cfg := s.cfg
	ms, err := storage.NewEtcdStore(fmt.Sprintf("bench/scale/%s/%d", tag, time.Now().UnixNano()), &cfg)
	require.NoError(b, err)
	b.Cleanup(func() { _ = ms.Close() })
	return ms
}

// serverMiB is the child's resident MiB; NaN in process, where
// base-live-MiB shows the server's heap.
func (s *scaleEtcd) serverMiB() float64 {
	if s.child == nil {
		return math.NaN()
	}
	return s.child.rssMiB()
}

// afterBuild compacts the etcd history up to now, so that the build's
// overwritten and deleted keys do not count against the quota of what
// follows (migrate doubles the store).
func (s *scaleEtcd) afterBuild(b *testing.B) {
	cli, err := clientv3.New(s.cfg)
	require.NoError(b, err)
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	resp, err := cli.Get(ctx, "bench/scale/compact")
	require.NoError(b, err)
	_, err = cli.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical())
	require.NoError(b, err)
}

// minorFaults is the count of this process's minor page faults, NaN where
// /proc/self/stat cannot tell.
func minorFaults() float64 {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return math.NaN()
	}
	// The fields after the command's closing parenthesis, from the state
	// (field 3) on: minflt is field 10.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 8 {
		return math.NaN()
	}
	n, err := strconv.ParseFloat(f[7], 64)
	if err != nil {
		return math.NaN()
	}
	return n
}
