package e2e

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
	"go.uber.org/goleak"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
)

// busyboxPath is the static busybox the test images run.
const busyboxPath = "/bin/busybox"

// ns is the containerd namespace of every test.
const ns = "test"

// snapshotter is the proxy plugin's name in containerd's config.
const snapshotter = "snapmeta"

// raceBuild is set by race_test.go under -race: the daemon is then built
// with the race detector too, and a race in it fails the test.
var raceBuild bool

const raceExitCode = 66

var (
	buildOnce sync.Once
	binDir    string
	binary    string // the daemon, built on first use
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	if code == 0 {
		if err := goleak.Find(etcdtest.GoleakIgnores...); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// daemonBinary builds cmd/snapmeta-snapshotter once.
func daemonBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		if binDir, buildErr = os.MkdirTemp("", "snapmeta-e2e-"); buildErr != nil {
			return
		}
		binary = filepath.Join(binDir, "snapmeta-snapshotter")
		args := []string{"build", "-o", binary}
		if raceBuild {
			args = append(args, "-race")
		}
		out, err := exec.Command("go", append(args, "../cmd/snapmeta-snapshotter")...).CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	require.NoError(t, buildErr)
	return binary
}

// requirePrerequisites skips the test, saying what is missing, unless it
// runs as root with containerd, ctr, runc, the runc shim and a static
// busybox.
func requirePrerequisites(t *testing.T) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, bin := range []string{"containerd", "ctr", "runc", "containerd-shim-runc-v2"} {
		if _, err := exec.LookPath(bin); err != nil {
			missing = append(missing, bin+" on PATH")
		}
	}
	if f, err := elf.Open(busyboxPath); err != nil {
		missing = append(missing, "a static busybox at "+busyboxPath)
	} else {
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				missing = append(missing, "a static busybox at "+busyboxPath+" (it is dynamically linked)")
				break
			}
		}
		f.Close()
	}
	if len(missing) > 0 {
		t.Skipf("skipped: needs %s (Debian, as root: apt-get install -y containerd runc busybox-static)", strings.Join(missing, ", "))
	}
}

// proc is a process the test started; its output goes to a log file.
type proc struct {
	name   string
	cmd    *exec.Cmd
	log    string
	exited chan struct{}
	code   int // valid once exited is closed
}

// startProc starts a process; a test's cleanup kills it if it still runs.
func startProc(t *testing.T, name, logFile string, env []string, bin string, args ...string) *proc {
	t.Helper()
	f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	require.NoError(t, err)
	defer f.Close()
	p := &proc{name: name, log: logFile, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.Env = append(os.Environ(), env...)
	// Its own process group: a signal sent to the test (^C) reaches the
	// test, which cleans up in order.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, p.cmd.Start())
	go func() {
		err := p.cmd.Wait()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			p.code = ee.ExitCode()
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				p.code = 128 + int(ws.Signal())
			}
		case err != nil:
			p.code = -1
		}
		close(p.exited)
	}()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *proc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// kill sends SIGKILL and waits for the exit.
func (p *proc) kill() {
	if p.running() {
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// stop sends SIGTERM and waits up to timeout, then kills; it returns the
// exit code.
func (p *proc) stop(timeout time.Duration) int {
	if p.running() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(timeout):
			p.kill()
		}
	}
	<-p.exited
	return p.code
}

// tail returns the last n lines of the process's log.
func (p *proc) tail(n int) string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// tailMatching returns the last n lines of the process's log that match re.
func (p *proc) tailMatching(re *regexp.Regexp, n int) string {
	b, _ := os.ReadFile(p.log)
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if re.MatchString(l) {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// storeKind is the engine the daemon keeps its metadata in.
type storeKind struct {
	name string
	// live reports whether the test may read the store while the daemon
	// runs. A bbolt file is locked by the daemon that has it open, so the
	// daemon is stopped for each look.
	live bool
	// setup returns the daemon's store flags for its data root, and how
	// the test opens the same store.
	setup func(t *testing.T, root string) (flags []string, open func() (storage.MetaStore, error))
}

var (
	boltStore = storeKind{name: "bolt", setup: func(_ *testing.T, root string) ([]string, func() (storage.MetaStore, error)) {
		// The daemon's default store, <root>/metadata.db; the test
		// reads it read-only.
		return nil, func() (storage.MetaStore, error) {
			return storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"), func(o *bolt.Options) error {
				o.ReadOnly, o.Timeout = true, 5*time.Second
				return nil
			})
		}
	}}
	etcdStore = storeKind{name: "etcd", live: true, setup: func(t *testing.T, _ string) ([]string, func() (storage.MetaStore, error)) {
		c := etcdtest.Start(t)
		var hosts []string
		for _, ep := range c.Endpoints() {
			hosts = append(hosts, strings.TrimPrefix(ep, "http://"))
		}
		const root = "e2e/host-1"
		return []string{"--store", "etcd://" + strings.Join(hosts, ",") + "/" + root}, func() (storage.MetaStore, error) {
			cfg := c.ClientConfig()
			return storage.NewEtcdStore(root, &cfg)
		}
	}}
)

// env is a private containerd with the daemon as its proxy snapshotter.
type env struct {
	// top is the test, which owns every process and cleanup; t is the
	// test or the step (subtest) running now, for checks.
	top        *testing.T
	t          *testing.T
	driver     string
	layout     layout // the driver's directories
	store      storeKind
	base       string // everything but the sockets lives here
	root       string // the daemon's data root
	daemonSock string
	ctrdSock   string
	storeFlags []string
	openStore  func() (storage.MetaStore, error)
	daemonArgs []string // given to every start of the daemon, after the store flags
	daemon     *proc
	containerd *proc
	starts     int // daemon starts, to name their logs
	probes     int // waitReachable's probes, to name them
	leases     int // collectGarbage's leases, to name them
	mounts     int // withTree's mount points, to name them
	execs      int // exec's process IDs, to name them
}

// newEnv starts the daemon (driver on store) and a containerd using it.
func newEnv(t *testing.T, driver string, store storeKind) *env {
	t.Helper()
	return startEnv(t, driver, store, nil)
}

// sharedSetup makes an env use a data root and a store it shares with
// others, instead of its own (see hosts_test.go).
type sharedSetup struct {
	root       string
	storeFlags []string
	openStore  func() (storage.MetaStore, error)
	daemonArgs []string
}

// startEnv is newEnv; with shared, the daemon uses shared's data root,
// store and arguments.
func startEnv(t *testing.T, driver string, store storeKind, shared *sharedSetup) *env {
	t.Helper()
	requirePrerequisites(t)
	l, ok := layouts[driver]
	require.True(t, ok, "no layout for driver %q", driver)
	bin := daemonBinary(t)
	e := &env{top: t, t: t, driver: driver, layout: l, store: store, base: t.TempDir()}
	// Unix socket paths are limited to 107 bytes: they live in a short
	// directory of their own.
	sockDir, err := os.MkdirTemp("/tmp", "sm")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	e.daemonSock = filepath.Join(sockDir, "snap.sock")
	e.ctrdSock = filepath.Join(sockDir, "ctrd.sock")
	e.root = filepath.Join(e.base, "snapmeta")
	if shared != nil {
		e.root, e.storeFlags, e.openStore, e.daemonArgs = shared.root, shared.storeFlags, shared.openStore, shared.daemonArgs
	} else {
		e.storeFlags, e.openStore = store.setup(t, e.root)
	}
	e.startDaemon(bin)

	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  level = "info"

[proxy_plugins.%s]
  type = "snapshot"
  address = %q

# Collect garbage right after every removal, so the tests' bounded waits are
# short, and only then: a collection removes every snapshot that no root
# references, and the tests hold such snapshots for a moment (a commit made
# with ctr, until it is labelled).
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  mutation_threshold = 0
  schedule_delay = "0s"
  startup_delay = "100ms"
`, filepath.Join(e.base, "containerd-root"), filepath.Join(e.base, "containerd-state"),
		e.ctrdSock, e.ctrdSock+".ttrpc", snapshotter, e.daemonSock)
	cfgPath := filepath.Join(e.base, "config.toml")
	require.NoError(t, os.WriteFile(cfgPath, []byte(config), 0o644))
	e.containerd = startProc(t, "containerd", filepath.Join(e.base, "containerd.log"), nil, "containerd", "--config", cfgPath)
	// Registered after the daemon's, so it runs before: containerd and
	// its containers go first, then the daemon.
	t.Cleanup(e.cleanupContainerd)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := e.ctr(10*time.Second, "version"); err == nil {
			break
		}
		if !e.containerd.running() || time.Now().After(deadline) {
			t.Fatalf("containerd did not start:\n%s", e.containerd.tail(40))
		}
		time.Sleep(50 * time.Millisecond)
	}
	out, _ := e.ctr(10*time.Second, "version")
	t.Logf("containerd %s, driver %s, store %s", serverVersion(out), driver, store.name)
	return e
}

func serverVersion(out string) string {
	if i := strings.Index(out, "Server:"); i >= 0 {
		for _, l := range strings.Split(out[i:], "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(l), "Version:"); ok {
				return strings.TrimSpace(v)
			}
		}
	}
	return "(unknown version)"
}

// startDaemon starts the daemon and waits (at most 30 s) until it serves.
func (e *env) startDaemon(bin string) {
	t := e.t
	t.Helper()
	e.starts++
	args := append([]string{"--socket", e.daemonSock, "--root", e.root, "--driver", e.driver, "--log-level", "debug"}, e.storeFlags...)
	args = append(args, e.daemonArgs...)
	e.daemon = startProc(e.top, "daemon", filepath.Join(e.base, fmt.Sprintf("daemon-%d.log", e.starts)),
		[]string{fmt.Sprintf("GORACE=halt_on_error=1 exitcode=%d", raceExitCode)}, bin, args...)
	d, top := e.daemon, e.top
	top.Cleanup(func() {
		d.stop(20 * time.Second)
		if d.code == raceExitCode {
			top.Errorf("data race in the daemon:\n%s", d.tail(200))
		}
		if top.Failed() {
			top.Logf("daemon log (%s), last lines:\n%s", d.log, d.tail(30))
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.DialTimeout("unix", e.daemonSock, time.Second); err == nil {
			c.Close()
			return
		}
		if !d.running() {
			t.Fatalf("daemon exited with %d:\n%s", d.code, d.tail(20))
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not serving after 30s:\n%s", d.tail(20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stopDaemon stops the daemon with SIGTERM; it must exit 0 within 20 s and
// leave no socket.
func (e *env) stopDaemon() {
	t := e.t
	t.Helper()
	code := e.daemon.stop(20 * time.Second)
	require.Equal(t, 0, code, "daemon exit code:\n%s", e.daemon.tail(20))
	require.NoFileExists(t, e.daemonSock)
}

// restartDaemon stops the daemon and starts a new one under the running
// containerd, and waits until containerd reaches it.
func (e *env) restartDaemon() {
	e.t.Helper()
	e.stopDaemon()
	e.startDaemon(binary)
	e.waitReachable()
}

// probeNS is the containerd namespace of waitReachable's probes, apart
// from the tests' snapshots.
const probeNS = "e2e-probe"

// waitReachable waits (at most 30 s) until containerd reaches the daemon:
// its proxy client reconnects on its own, after a backoff of up to a few
// seconds. The probe prepares and removes a snapshot in probeNS. The
// removal also makes containerd collect the daemon's garbage again: a
// collection that ran while the daemon was down could not remove anything,
// and containerd does not retry it until the next removal.
func (e *env) waitReachable() {
	t := e.t
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for attempt := 1; ; attempt++ {
		e.probes++
		key := fmt.Sprintf("probe-%d", e.probes)
		_, err := e.ctrNS(probeNS, 10*time.Second, "snapshots", "--snapshotter", snapshotter, "prepare", key)
		if err == nil {
			_, err = e.ctrNS(probeNS, 30*time.Second, "snapshots", "--snapshotter", snapshotter, "rm", key)
			require.NoError(t, err)
			e.collectGarbage()
			t.Logf("reachable after %d attempt(s)", attempt)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not reach the daemon within 30s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// collectGarbage makes containerd collect garbage now and waits until it
// has, in the daemon too: removing a lease with --sync runs a collection
// and returns when it is done. Afterwards no collection is pending.
func (e *env) collectGarbage() {
	t := e.t
	t.Helper()
	e.leases++
	id := fmt.Sprintf("e2e-gc-%d", e.leases)
	_, err := e.ctrNS(probeNS, time.Minute, "leases", "create", "--id", id)
	require.NoError(t, err)
	_, err = e.ctrNS(probeNS, 2*time.Minute, "leases", "rm", "--sync", id)
	require.NoError(t, err)
}

// inspect runs fn on the daemon's store as the library opens it. A bbolt
// file is locked while the daemon has it open: the daemon is stopped for
// the look and started again (under the running containerd); etcd is read
// while the daemon runs.
func (e *env) inspect(fn func(ms storage.MetaStore)) {
	t := e.t
	t.Helper()
	if !e.store.live {
		e.stopDaemon()
		defer e.waitReachable()
		defer e.startDaemon(binary)
	}
	ms, err := e.openStore()
	require.NoError(t, err)
	defer func() { require.NoError(t, ms.Close()) }()
	fn(ms)
}

// ctr runs ctr against this containerd in namespace ns and returns its
// stdout; an error carries stderr.
func (e *env) ctr(timeout time.Duration, args ...string) (string, error) {
	return e.ctrNS(ns, timeout, args...)
}

func (e *env) ctrNS(namespace string, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"--address", e.ctrdSock, "-n", namespace}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// mustCtr runs ctr (at most 2 minutes) and fails the test if it fails.
func (e *env) mustCtr(args ...string) string {
	e.t.Helper()
	out, err := e.ctr(2*time.Minute, args...)
	require.NoError(e.t, err)
	return out
}

// snap runs "ctr snapshots --snapshotter snapmeta args".
func (e *env) snap(timeout time.Duration, args ...string) (string, error) {
	return e.ctr(timeout, append([]string{"snapshots", "--snapshotter", snapshotter}, args...)...)
}

func (e *env) mustSnap(args ...string) string {
	e.t.Helper()
	out, err := e.snap(2*time.Minute, args...)
	require.NoError(e.t, err)
	return out
}

// cleanupContainerd removes every container and task of the namespace,
// stops containerd, and kills the shims and unmounts what it left.
func (e *env) cleanupContainerd() {
	t := e.top
	if e.containerd.running() {
		if out, err := e.ctr(30*time.Second, "tasks", "ls", "-q"); err == nil {
			for _, id := range strings.Fields(out) {
				_, _ = e.ctr(30*time.Second, "tasks", "kill", "-s", "SIGKILL", id)
				_, _ = e.ctr(30*time.Second, "tasks", "rm", "-f", id)
			}
		}
		if out, err := e.ctr(30*time.Second, "containers", "ls", "-q"); err == nil {
			for _, id := range strings.Fields(out) {
				_, _ = e.ctr(30*time.Second, "containers", "rm", id)
			}
		}
	}
	e.containerd.stop(15 * time.Second)
	if t.Failed() {
		t.Logf("containerd log (%s), last warnings and errors:\n%s", e.containerd.log, e.containerd.tailMatching(regexp.MustCompile(`level=(warning|error|fatal)`), 40))
	}
	killShims(t, e.ctrdSock)
	unmountUnder(t, e.base)
	// containerd leaves the namespace's cgroup behind; rmdir removes it
	// only when empty, so nothing in use is touched.
	cgroups, _ := filepath.Glob("/sys/fs/cgroup/*/" + ns)
	for _, cg := range append(cgroups, "/sys/fs/cgroup/"+ns) {
		_ = syscall.Rmdir(cg)
	}
}

// killShims kills the runc shims of the containerd at address: they
// outlive containerd by design.
func killShims(t *testing.T, address string) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte("containerd-shim")) || !bytes.Contains(b, []byte(address)) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(p, "/proc/%d/cmdline", &pid); err == nil {
			t.Logf("killing shim %d left by containerd", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// unmountUnder detaches every mount below dir (a killed containerd may
// leave a container's root file system mounted), deepest first.
func unmountUnder(t *testing.T, dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var points []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			points = append(points, fields[4])
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		t.Logf("unmounting %s", points[i])
		_ = syscall.Unmount(points[i], syscall.MNT_DETACH)
	}
}

// record is one snapshot of the store.
type record struct {
	name  string
	id    string
	info  snapshots.Info
	usage snapshots.Usage
}

// depth is the number of ancestors of r in recs.
func depth(recs map[string]record, r record) int {
	n := 0
	for p := r.info.Parent; p != ""; p = recs[p].info.Parent {
		n++
		if n > len(recs) {
			return -1 // a loop; Check reports it
		}
	}
	return n
}

// readStore returns every snapshot of the store, by name.
func readStore(t *testing.T, ms storage.MetaStore) map[string]record {
	t.Helper()
	recs := map[string]record{}
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		clear(recs)
		var names []string
		if err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			names = append(names, info.Name)
			return nil
		}); err != nil {
			return err
		}
		for _, n := range names {
			id, info, usage, err := storage.GetInfo(ctx, n)
			if err != nil {
				return err
			}
			recs[n] = record{name: n, id: id, info: info, usage: usage}
		}
		return nil
	}))
	return recs
}

// ofTests returns the snapshots of the tests' namespace: without the
// probes of waitReachable, which containerd collects a moment later.
func ofTests(recs map[string]record) map[string]record {
	out := map[string]record{}
	for n, r := range recs {
		if strings.HasPrefix(n, ns+"/") {
			out[n] = r
		}
	}
	return out
}

// backendName finds the store's name of containerd's snapshot key in
// namespace ns: containerd names its backend snapshots "<ns>/<n>/<key>".
func backendName(t *testing.T, recs map[string]record, key string) (record, bool) {
	t.Helper()
	re := regexp.MustCompile("^" + regexp.QuoteMeta(ns) + `/[0-9]+/` + regexp.QuoteMeta(key) + "$")
	var found []record
	for n, r := range recs {
		if re.MatchString(n) {
			found = append(found, r)
		}
	}
	require.LessOrEqual(t, len(found), 1, "several backend snapshots for %s: %v", key, found)
	if len(found) == 0 {
		return record{}, false
	}
	return found[0], true
}

// requireClean checks the store's invariants with storage.Check.
func requireClean(t *testing.T, ms storage.MetaStore) {
	t.Helper()
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	require.Empty(t, problems, "storage.Check")
}

// snapshotDirs lists the driver's snapshot directories.
func (e *env) snapshotDirs() []string {
	entries, err := os.ReadDir(filepath.Join(e.root, "snapshots"))
	require.NoError(e.t, err)
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	return names
}

// step runs fn as the subtest name, and stops the test if it fails: each
// step builds on the ones before.
func (e *env) step(name string, fn func(t *testing.T)) {
	top := e.top
	top.Helper()
	ok := top.Run(name, func(t *testing.T) {
		e.t = t
		defer func() { e.t = top }()
		began := time.Now()
		fn(t)
		t.Logf("%s took %v", name, time.Since(began).Round(time.Millisecond))
	})
	if !ok {
		top.FailNow()
	}
}

// eventually polls cond every interval until it holds, for at most
// timeout, and fails the test with what with says otherwise.
func eventually(t *testing.T, timeout time.Duration, cond func() bool, what func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", timeout, what())
		}
		time.Sleep(100 * time.Millisecond)
	}
}
