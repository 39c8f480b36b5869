package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	ctrstorage "github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// binary is the snapmeta command built once by TestMain.
var binary string

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "snapmeta-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "snapmeta")
	out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		// Stores the tests open in-process must all be closed.
		if err := goleak.Find(etcdtest.GoleakIgnores...); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// result is one run of the binary.
type result struct {
	stdout, stderr string
	code           int
}

// snapmeta runs the binary with args (and optional stdin) and returns what
// it printed and its exit code.
func snapmeta(t *testing.T, stdin string, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = append(cleanEnv(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("snapmeta %s: %v", strings.Join(args, " "), err)
	}
	return result{stdout: stdout.String(), stderr: stderr.String(), code: code}
}

// exe is snapmeta without stdin or extra environment.
func exe(t *testing.T, args ...string) result {
	t.Helper()
	return snapmeta(t, "", nil, args...)
}

// ok runs snapmeta and fails the test unless it exits 0 with nothing on
// stderr; it returns stdout.
func ok(t *testing.T, args ...string) string {
	t.Helper()
	r := exe(t, args...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("snapmeta %s: exit %d\nstderr: %s\nstdout: %s", strings.Join(args, " "), r.code, r.stderr, r.stdout)
	}
	return r.stdout
}

// cleanEnv is the test's environment without snapmeta's own variables.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SNAPMETA_") {
			env = append(env, kv)
		}
	}
	return env
}

// wantFail checks an exit code and a one-line error containing want.
func wantFail(t *testing.T, r result, code int, want string) {
	t.Helper()
	if r.code != code {
		t.Errorf("exit code %d, want %d\nstderr: %s\nstdout: %s", r.code, code, r.stderr, r.stdout)
	}
	if !strings.Contains(r.stderr, want) {
		t.Errorf("stderr %q does not contain %q", r.stderr, want)
	}
	if lines := strings.Count(r.stderr, "\n"); lines != 1 || !strings.HasPrefix(r.stderr, "snapmeta: ") {
		t.Errorf("stderr is not one 'snapmeta: ...' line: %q", r.stderr)
	}
}

var (
	timeRE = regexp.MustCompile(`\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z`)
	tmpRE  = regexp.MustCompile(`/tmp/[^ )"\n]*`)
)

// mask replaces what changes from run to run: times and temporary paths.
func mask(s string) string {
	s = timeRE.ReplaceAllString(s, "<TIME>")
	return tmpRE.ReplaceAllString(s, "<TMP>")
}

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from the golden file (go test -update rewrites it)\n--- got\n%s--- want\n%s", name, got, want)
	}
}

// fixture builds the known store of the golden files on ms: two branches
// of committed layers, an active container, a view, a parentless active
// and a removed snapshot (an ID gap). IDs are deterministic.
func fixture(t *testing.T, ms storage.MetaStore) {
	t.Helper()
	ctx := context.Background()
	tx := func(fn func(ctx context.Context) error) {
		t.Helper()
		if err := ms.WithTransaction(ctx, true, fn); err != nil {
			t.Fatal(err)
		}
	}
	layer := func(key, name, parent string, size, inodes int64, labels map[string]string) {
		t.Helper()
		tx(func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent)
			return err
		})
		tx(func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, key, name, snapshots.Usage{Size: size, Inodes: inodes}, snapshots.WithLabels(labels))
			return err
		})
	}
	layer("extract-1", "layer-1", "", 1<<20, 100, map[string]string{"containerd.io/snapshot.ref": "layer-1"})
	layer("extract-2", "layer-2", "layer-1", 5<<20+123, 321, nil)
	layer("extract-3", "layer-3", "layer-2", 2048, 3, map[string]string{"a": "1", "b": "two words"})
	layer("extract-4", "other-2", "layer-1", 700, 1, nil)
	tx(func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "web", "layer-3", snapshots.WithLabels(map[string]string{"app": "web"})); err != nil {
			return err
		}
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindView, "web-view", "layer-3"); err != nil {
			return err
		}
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "scratch", ""); err != nil {
			return err
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "tmp", "other-2")
		return err
	})
	tx(func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, "tmp")
		return err
	})
}

// boltFixture writes the fixture to a new bbolt file and returns its path.
func boltFixture(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "metadata.db")
	ms, err := storage.NewBoltMetaStore(path)
	if err != nil {
		t.Fatal(err)
	}
	fixture(t, ms)
	if err := ms.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// etcdStore starts an embedded etcd for the test and returns its address
// for root.
func etcdStore(t *testing.T, c *etcdtest.Cluster, root string) (string, storage.MetaStore) {
	t.Helper()
	cfg := c.ClientConfig()
	ms, err := storage.NewEtcdStore(root, &cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ms.Close() })
	var hosts []string
	for _, ep := range c.Endpoints() {
		hosts = append(hosts, strings.TrimPrefix(ep, "http://"))
	}
	return "etcd://" + strings.Join(hosts, ",") + "/" + root, ms
}

func TestDemoBolt(t *testing.T) {
	out := ok(t, "demo")
	golden(t, "demo.golden", mask(out))
	for _, want := range []string{"Step 1.", "├── ", "└── ", "no problems"} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}

// TestDemoEtcd runs the demo on an embedded etcd: apart from the lines that
// name the store and the last step (two hosts, etcd only), the output is
// the bbolt demo's, IDs included.
func TestDemoEtcd(t *testing.T) {
	out := ok(t, "demo", "--etcd")
	bolt := ok(t, "demo")
	race, rest := demoRaceStep(t, out)
	assert.NotEmpty(t, race)
	assert.NotContains(t, bolt, "Two hosts")
	out = rest
	strip := func(s string) string {
		var keep []string
		for _, l := range strings.Split(mask(s), "\n") {
			if strings.HasPrefix(l, "snapmeta demo on ") || strings.HasPrefix(l, "Starting an etcd server") {
				continue
			}
			keep = append(keep, l)
		}
		return strings.Join(keep, "\n")
	}
	if !strings.Contains(out, "snapmeta demo on etcd://127.0.0.1:") {
		t.Errorf("etcd demo does not name its store:\n%s", out)
	}
	if strip(out) != strip(bolt) {
		t.Errorf("etcd demo differs from the bbolt demo\n--- etcd\n%s\n--- bolt\n%s", strip(out), strip(bolt))
	}
}

// demoRaceStep cuts the etcd-only step "Two hosts, one store" out of a
// demo's output.
func demoRaceStep(t *testing.T, out string) (step, rest string) {
	t.Helper()
	start := strings.Index(out, "\n\nStep 10. Two hosts, one store")
	end := strings.Index(out, "\n\nDone.")
	require.True(t, start >= 0 && end > start, "no two-host step before Done:\n%s", out)
	return out[start:end], out[:start] + out[end:]
}

// TestDemoEtcdTwoHostsRace: on etcd the demo's last step has two clients
// race for one name (one wins, the other's commit conflicts and its retry
// finds the name taken) and increment one label (the slower transaction
// conflicts, is retried, and no increment is lost), on the embedded etcd
// and on an etcd ADDRESS alike.
func TestDemoEtcdTwoHostsRace(t *testing.T) {
	c := etcdtest.Start(t)
	addr, ms := etcdStore(t, c, "demo-race")
	require.NoError(t, ms.Close())
	for _, args := range [][]string{{"demo", "--etcd"}, {"demo", addr}} {
		t.Run(args[1], func(t *testing.T) {
			step, _ := demoRaceStep(t, ok(t, args...))
			for _, want := range []string{
				`host A prepares "build-cache" on the image, and has not committed yet`,
				`host B prepares "build-cache" too, and commits first -> id `,
				`: transaction conflict (errdefs.IsConflict)`,
				`host A tries again -> refused: snapshot "build-cache": already exists`,
				"    host A, attempt 1: reads 0, writes 1\n    host B meanwhile: reads 0, writes 1, commits\n    host A, attempt 2: reads 1, writes 2\n",
				"host A's first attempt conflicted with host B's commit, and WithTransaction",
				"demo/hits is now 2, as host B reads it: no increment lost",
				"check after the race: no problems",
			} {
				assert.Contains(t, step, want)
			}
		})
	}
}

// TestDemoKeepEtcdIsRefused: the embedded etcd's data cannot outlive the
// demo, so --keep with --etcd is a usage error, before etcd starts.
func TestDemoKeepEtcdIsRefused(t *testing.T) {
	r := exe(t, "demo", "--keep", "--etcd")
	wantFail(t, r, 2, "--keep keeps the demo's bbolt file; the embedded etcd of --etcd ends with the demo, data and all (to keep an etcd demo, run it on your own etcd: snapmeta demo etcd://HOST:2379/ROOT)")
	assert.Empty(t, r.stdout)
}

func TestDemoKeep(t *testing.T) {
	out := ok(t, "demo", "--keep")
	m := regexp.MustCompile(`snapmeta tree --store (\S+)\n`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("demo --keep names no store:\n%s", out)
	}
	defer os.RemoveAll(filepath.Dir(m[1]))
	if got := ok(t, "check", "--store", m[1]); got != "ok: 5 snapshots, no problems\n" {
		t.Errorf("check of the kept store: %q", got)
	}
}

func TestDemoOnGivenStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "demo.db")
	out := ok(t, "demo", "bolt://"+path)
	if !strings.Contains(out, "no problems") {
		t.Errorf("demo output:\n%s", out)
	}
	// The store now holds the demo's snapshots: a second run refuses it.
	wantFail(t, exe(t, "demo", path), 1, "the demo needs a store without snapshots; this one has 5")
	if got := ok(t, "check", "--store", path); got != "ok: 5 snapshots, no problems\n" {
		t.Errorf("check after demo: %q", got)
	}
}

// TestInspectGolden compares ls, info, tree, ids and check on the fixture
// with the golden files; times are masked.
func TestInspectGolden(t *testing.T) {
	path := boltFixture(t)
	for _, tc := range []struct {
		golden string
		args   []string
	}{
		{"ls.golden", []string{"ls"}},
		{"ls-json.golden", []string{"ls", "--json"}},
		{"ls-filter.golden", []string{"ls", "kind==committed,parent==layer-1", "kind==view"}},
		{"ls-label.golden", []string{"ls", `labels."containerd.io/snapshot.ref"`}},
		{"info.golden", []string{"info", "layer-3"}},
		{"info-active.golden", []string{"info", "web"}},
		{"info-json.golden", []string{"info", "web", "--json"}},
		{"tree.golden", []string{"tree"}},
		{"tree-json.golden", []string{"tree", "--json"}},
		{"ids.golden", []string{"ids"}},
		{"ids-json.golden", []string{"ids", "--json"}},
		{"check.golden", []string{"check"}},
		{"export.golden", []string{"export"}},
	} {
		t.Run(strings.TrimSuffix(tc.golden, ".golden"), func(t *testing.T) {
			args := append(tc.args, "--store", "bolt://"+path)
			golden(t, tc.golden, mask(ok(t, args...)))
		})
	}
	// A bare path and $SNAPMETA_STORE name the same store.
	want := ok(t, "ls", "--store", "bolt://"+path)
	if got := ok(t, "ls", "--store", path); got != want {
		t.Errorf("ls with a bare path differs:\n%s", got)
	}
	if r := snapmeta(t, "", []string{"SNAPMETA_STORE=" + path}, "ls"); r.code != 0 || r.stdout != want {
		t.Errorf("ls with SNAPMETA_STORE: exit %d, %s%s", r.code, r.stdout, r.stderr)
	}
}

// TestInspectEtcd runs the inspect commands on the same fixture in etcd:
// the output equals the bbolt store's.
func TestInspectEtcd(t *testing.T) {
	c := etcdtest.Start(t)
	addr, ms := etcdStore(t, c, "fixture")
	fixture(t, ms)
	path := boltFixture(t)
	for _, args := range [][]string{
		{"ls"}, {"ls", "--json"}, {"ls", "kind==active"}, {"info", "layer-3"}, {"info", "web", "--json"},
		{"tree"}, {"tree", "--json"}, {"ids"}, {"check"}, {"export"},
	} {
		got := mask(ok(t, append(args, "--store", addr)...))
		want := mask(ok(t, append(args, "--store", path)...))
		if got != want {
			t.Errorf("snapmeta %s on etcd differs from bbolt\n--- etcd\n%s--- bolt\n%s", strings.Join(args, " "), got, want)
		}
	}
	// A store whose snapshots are all gone is still a store.
	for _, name := range []string{"web", "web-view", "scratch", "layer-3", "other-2", "layer-2", "layer-1"} {
		require.NoError(t, ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, name)
			return err
		}))
	}
	if got := ok(t, "ls", "--store", addr); got != "KIND  NAME  PARENT  ID  SIZE  CREATED\n" {
		t.Errorf("ls of an emptied store: %q", got)
	}
	if got := ok(t, "tree", "--store", addr); got != "(no snapshots)\n" {
		t.Errorf("tree of an emptied store: %q", got)
	}
}

func TestEtcdUnreachable(t *testing.T) {
	start := time.Now()
	r := exe(t, "ls", "--store", "etcd://127.0.0.1:1/x", "--dial-timeout", "500ms")
	wantFail(t, r, 1, "etcd 127.0.0.1:1 did not answer within 500ms")
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %v", d)
	}
	wantFail(t, exe(t, "check", "--store", "etcd://127.0.0.1:1/x", "--dial-timeout", "500ms"), 2, "did not answer")
}

// TestLockedFile holds the bbolt file open for writing, as a running daemon
// does: read commands say so and fail at once.
func TestLockedFile(t *testing.T) {
	path := boltFixture(t)
	ms, err := storage.NewBoltMetaStore(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close()
	const msg = "is locked by another process; stop it or copy the file"
	start := time.Now()
	wantFail(t, exe(t, "ls", "--store", path), 1, path+" "+msg)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("ls on a locked file took %v", d)
	}
	wantFail(t, exe(t, "check", "--store", path), 2, msg)
	wantFail(t, exe(t, "export", "--store", path), 1, msg)
	wantFail(t, exe(t, "import", "--store", path, "/dev/null"), 1, msg)
	// Once the holder is gone the file reads again.
	if err := ms.Close(); err != nil {
		t.Fatal(err)
	}
	ok(t, "ls", "--store", path)
}

// TestReadOnly: read commands open a bbolt file read-only: they run while
// another reader holds it and never change it.
func TestReadOnly(t *testing.T) {
	path := boltFixture(t)
	before := fileSum(t, path)
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, args := range [][]string{{"ls"}, {"info", "web"}, {"tree"}, {"ids"}, {"check"}, {"export"}} {
		ok(t, append(args, "--store", path)...)
	}
	if fileSum(t, path) != before {
		t.Error("a read command changed the file")
	}
	wantFail(t, exe(t, "ls", "--store", filepath.Join(t.TempDir(), "missing.db")), 1, "missing.db does not exist")
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestCheckExitCodes(t *testing.T) {
	path := boltFixture(t)
	if got := ok(t, "check", "--store", path); got != "ok: 7 snapshots, no problems\n" {
		t.Errorf("check on a clean store: %q", got)
	}

	// Corrupt it as a crash in a careless tool could: delete the bucket of
	// layer-3, the parent of web and web-view.
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots)).DeleteBucket([]byte("layer-3"))
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	r := exe(t, "check", "--store", path)
	if r.code != 1 {
		t.Fatalf("check on a corrupt store: exit %d, want 1\n%s%s", r.code, r.stdout, r.stderr)
	}
	golden(t, "check-corrupt.golden", r.stdout)
	if r.stderr != "snapmeta: 4 problem(s) found\n" && !strings.HasSuffix(r.stderr, "problem(s) found\n") {
		t.Errorf("stderr: %q", r.stderr)
	}
	for _, want := range []string{`snapshot "web": parent "layer-3" does not exist`, `snapshot "web-view": parent "layer-3" does not exist`} {
		if !strings.Contains(r.stdout, want+"\n") {
			t.Errorf("check output lacks the line %q:\n%s", want, r.stdout)
		}
	}
	// The orphans are still listed, and marked in the tree.
	golden(t, "tree-corrupt.golden", mask(ok(t, "tree", "--store", path)))
	// Export writes them, with a warning each; migrate refuses the store.
	r = exe(t, "export", "--store", path)
	if r.code != 0 || strings.Count(r.stdout, "\n") != 6 ||
		r.stderr != "snapmeta: warning: snapshot \"web\" has a missing parent; import will refuse it\n"+
			"snapmeta: warning: snapshot \"web-view\" has a missing parent; import will refuse it\n" {
		t.Errorf("export of a corrupt store: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	target := filepath.Join(t.TempDir(), "never.db")
	wantFail(t, exe(t, "migrate", "--from", path, "--to", target), 1, "source has 5 problem(s), the first: snapshot \"web\": parent \"layer-3\" does not exist")
	if _, err := os.Stat(target); err == nil {
		t.Error("a refused migrate created the target")
	}

	// A store that cannot be read: 2.
	wantFail(t, exe(t, "check", "--store", filepath.Join(t.TempDir(), "none.db")), 2, "does not exist")
	notBolt := filepath.Join(t.TempDir(), "garbage.db")
	if err := os.WriteFile(notBolt, bytes.Repeat([]byte("garbage!"), 1024), 0o600); err != nil {
		t.Fatal(err)
	}
	wantFail(t, exe(t, "check", "--store", notBolt), 2, "garbage.db")
}

// TestContainerdFile reads a metadata.db written by containerd's own store
// package.
func TestContainerdFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "metadata.db")
	ms, err := ctrstorage.NewMetaStore(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	tx := func(fn func(ctx context.Context) error) {
		t.Helper()
		if err := ms.WithTransaction(ctx, true, fn); err != nil {
			t.Fatal(err)
		}
	}
	parent := ""
	for i, size := range []int64{30 << 20, 4 << 20, 512} {
		key, name := fmt.Sprintf("extract-%d", i), fmt.Sprintf("sha256:%064d", i+1)
		tx(func(ctx context.Context) error {
			if _, err := ctrstorage.CreateSnapshot(ctx, snapshots.KindActive, key, parent); err != nil {
				return err
			}
			_, err := ctrstorage.CommitActive(ctx, key, name, snapshots.Usage{Size: size, Inodes: int64(i + 10)},
				snapshots.WithLabels(map[string]string{"containerd.io/snapshot.ref": name}))
			return err
		})
		parent = name
	}
	tx(func(ctx context.Context) error {
		if _, err := ctrstorage.CreateSnapshot(ctx, snapshots.KindActive, "ctr-1", parent); err != nil {
			return err
		}
		_, err := ctrstorage.CreateSnapshot(ctx, snapshots.KindView, "ctr-view", parent)
		return err
	})
	if err := ms.Close(); err != nil {
		t.Fatal(err)
	}
	before := fileSum(t, path)

	golden(t, "containerd-ls.golden", mask(ok(t, "ls", "--store", path)))
	golden(t, "containerd-tree.golden", mask(ok(t, "tree", "--store", path)))
	golden(t, "containerd-info.golden", mask(ok(t, "info", "ctr-1", "--store", path)))
	golden(t, "containerd-ids.golden", ok(t, "ids", "--store", path))
	if got := ok(t, "check", "--store", path); got != "ok: 5 snapshots, no problems\n" {
		t.Errorf("check: %q", got)
	}
	if fileSum(t, path) != before {
		t.Error("reading containerd's file changed it")
	}
}

// TestErrors: every failure is one line on stderr and a non-zero exit code.
func TestErrors(t *testing.T) {
	path := boltFixture(t)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"nosuchcommand"}, 2, `unknown command "nosuchcommand"`},
		{[]string{"ls", "--nosuchflag"}, 2, "unknown flag: --nosuchflag"},
		{[]string{"ls"}, 2, "no store given: name it as the argument, use --store ADDRESS or set SNAPMETA_STORE"},
		{[]string{"ls", "--store", "ftp://x/y"}, 2, `unknown store address scheme "ftp"`},
		{[]string{"ls", "--store", "etcd://h:2379"}, 2, "has no root"},
		{[]string{"ls", "--store", "etcd:///root"}, 2, "has no etcd endpoint"},
		{[]string{"ls", "--store", "bolt://"}, 2, "has no file path"},
		{[]string{"info", "--store", path}, 2, "info takes one snapshot NAME"},
		{[]string{"info", "nope", "--store", path}, 1, `snapshot "nope" does not exist`},
		{[]string{"ls", "--store", path, "kind=="}, 2, "filters: parse error"},
		{[]string{"tree", "extra", "--store", path}, 2, "two stores given: --store " + path + " and extra"},
		{[]string{"tree", "a", "b"}, 2, "tree takes at most one argument, the STORE"},
		{[]string{"migrate", "--from", path}, 2, "migrate needs --from SOURCE and --to TARGET"},
		{[]string{"migrate", "--from", path, "--to", "bolt://" + path}, 2, "--from and --to name the same store"},
		{[]string{"import", "--store", path, "--batch", "0"}, 2, "--batch must be between 1 and"},
		{[]string{"ls", "--store", "etcd://h:1/r", "--user", "bob"}, 2, "no password for etcd user \"bob\""},
		{[]string{"ls", "--store", "etcd://h:1/r", "--cert", "c.pem"}, 2, "--cert and --key go together"},
		{[]string{"demo", "--etcd", path}, 2, "give an ADDRESS or --etcd, not both"},
		{[]string{"help", "nosuch"}, 2, `unknown help topic "nosuch"`},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			wantFail(t, exe(t, tc.args...), tc.code, tc.want)
		})
	}
}

// TestHelp: every command's --help shows an example.
func TestHelp(t *testing.T) {
	for _, cmd := range []string{"", "demo", "ls", "info", "tree", "ids", "check", "export", "import", "migrate", "version", "completion", "help"} {
		args := strings.Fields(cmd + " --help")
		out := ok(t, args...)
		if !strings.Contains(out, "Examples:\n  snapmeta ") {
			t.Errorf("snapmeta %s --help has no example:\n%s", cmd, out)
		}
	}
	if out := ok(t, "help", "migrate"); !strings.Contains(out, "snapmeta migrate --from") {
		t.Errorf("help migrate:\n%s", out)
	}
	if out := ok(t); !strings.Contains(out, "Available Commands:") {
		t.Errorf("snapmeta without arguments:\n%s", out)
	}
}

// TestExportOrder: export writes parents before children, every field, one
// line per snapshot; import checks a file before writing anything.
func TestExportOrder(t *testing.T) {
	path := boltFixture(t)
	out := ok(t, "export", "--store", path)
	seen := map[string]bool{}
	n := 0
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		for _, k := range []string{"name", "id", "kind", "parent", "labels", "created", "updated", "usage"} {
			if _, ok := m[k]; !ok {
				t.Errorf("line %q lacks %q", line, k)
			}
		}
		if p := m["parent"].(string); p != "" && !seen[p] {
			t.Errorf("%v comes before its parent %q", m["name"], p)
		}
		seen[m["name"].(string)] = true
		n++
	}
	if n != 7 {
		t.Errorf("%d lines, want 7", n)
	}
	file := filepath.Join(t.TempDir(), "x.jsonl")
	ok(t, "export", "--store", path, "-o", file)
	if b, _ := os.ReadFile(file); string(b) != out {
		t.Errorf("export -o wrote something else:\n%s", b)
	}

	// Bad files are refused before anything is written, with the line.
	target := filepath.Join(t.TempDir(), "t.db")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	for _, tc := range []struct {
		input, want string
	}{
		{"{not json}\n", "stdin:1: invalid character"},
		{`{"name":"a","id":"1","kind":"active","parent":"","labels":{},"created":"2025-01-01T00:00:00Z","updated":"2025-01-01T00:00:00Z","usage":{"size":0,"inodes":0},"extra":1}` + "\n", `stdin:1: json: unknown field "extra"`},
		{`{"name":"a","id":"x","kind":"active","created":"2025-01-01T00:00:00Z","updated":"2025-01-01T00:00:00Z"}` + "\n", `id "x" is not a positive decimal number`},
		{`{"name":"a","id":"1","kind":"frozen","created":"2025-01-01T00:00:00Z","updated":"2025-01-01T00:00:00Z"}` + "\n", `unknown snapshot kind "frozen"`},
		{lines[0] + "\n" + lines[0] + "\n", `stdin:2: snapshot "layer-1" is already on line 1`},
		{lines[1] + "\n" + lines[0] + "\n", `stdin:1: snapshot "layer-2" comes before its parent "layer-1" (line 2)`},
		{lines[0] + "\n" + strings.Replace(lines[1], `"id":"2"`, `"id":"1"`, 1) + "\n", `stdin:2: snapshot "layer-2" has the ID 1 of line 1`},
	} {
		wantFail(t, snapmeta(t, tc.input, nil, "import", "--store", target), 1, tc.want)
	}
	if _, err := os.Stat(target); err == nil {
		if got := ok(t, "ls", "--store", target); strings.Count(got, "\n") != 1 {
			t.Errorf("a refused import wrote:\n%s", got)
		}
	}
}

// TestExportImportRoundTrip: export, import into bbolt and etcd, export
// again: byte for byte the same, times and IDs included.
func TestExportImportRoundTrip(t *testing.T) {
	src := boltFixture(t)
	exported := ok(t, "export", "--store", src)

	dst := filepath.Join(t.TempDir(), "copy.db")
	r := snapmeta(t, exported, nil, "import", "--store", dst, "--batch", "3")
	if r.code != 0 || r.stdout != "imported 7 snapshots, skipped 0 identical\n" {
		t.Fatalf("import: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if again := ok(t, "export", "--store", dst); again != exported {
		t.Errorf("round trip through bbolt differs\n--- got\n%s--- want\n%s", again, exported)
	}
	if got := ok(t, "check", "--store", dst); got != "ok: 7 snapshots, no problems\n" {
		t.Errorf("check after import: %q", got)
	}
	// New snapshots get IDs above the imported ones (the highest is 7; the
	// source's removed 8 is not carried by an export).
	ms, err := storage.NewBoltMetaStore(dst)
	if err != nil {
		t.Fatal(err)
	}
	var s storage.Snapshot
	err = ms.WithTransaction(context.Background(), true, func(ctx context.Context) (err error) {
		s, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "new", "layer-3")
		return err
	})
	ms.Close()
	if err != nil {
		t.Fatal(err)
	}
	if s.ID != "8" || strings.Join(s.ParentIDs, " ") != "3 2 1" {
		t.Errorf("new snapshot after import: %+v, want ID 8 on 3 2 1", s)
	}

	// Again: refused, then skipped with --skip-existing.
	file := filepath.Join(t.TempDir(), "export.jsonl")
	if err := os.WriteFile(file, []byte(exported), 0o600); err != nil {
		t.Fatal(err)
	}
	wantFail(t, exe(t, "import", "--store", dst, file), 1, `snapshot "layer-1" exists (identical; use --skip-existing to skip identical records)`)
	if got := ok(t, "import", "--store", dst, file, "--skip-existing"); got != "imported 0 snapshots, skipped 7 identical\n" {
		t.Errorf("import --skip-existing: %q", got)
	}
	// A real difference is refused even with --skip-existing, and the batch
	// holding it is not written.
	changed := strings.Replace(exported, `"app":"web"`, `"app":"db"`, 1)
	wantFail(t, snapmeta(t, changed, nil, "import", "--store", dst, "--skip-existing"), 1,
		`snapshot "web" exists with a different record (given vs stored: labels {app=db} != {app=web})`)

	// An ID that another snapshot of the store holds is refused.
	clash := `{"name":"newcomer","id":"3","kind":"active","parent":"","labels":{},"created":"2025-01-01T00:00:00Z","updated":"2025-01-01T00:00:00Z","usage":{"size":0,"inodes":0}}` + "\n"
	wantFail(t, snapmeta(t, clash, nil, "import", "--store", dst), 1, `snapshot "newcomer": ID 3 belongs to snapshot "layer-3" in the store`)

	// Into etcd, with batches of one.
	c := etcdtest.Start(t)
	addr, _ := etcdStore(t, c, "imported")
	r = snapmeta(t, exported, nil, "import", "--store", addr, "--batch", "1")
	if r.code != 0 {
		t.Fatalf("import into etcd: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if again := ok(t, "export", "--store", addr); again != exported {
		t.Errorf("round trip through etcd differs\n--- got\n%s--- want\n%s", again, exported)
	}
	if got := ok(t, "check", "--store", addr); got != "ok: 7 snapshots, no problems\n" {
		t.Errorf("check after import into etcd: %q", got)
	}
}

// TestImportAtomicBatch: a batch holding a refused record writes nothing of
// that batch; earlier batches stay.
func TestImportAtomicBatch(t *testing.T) {
	exported := ok(t, "export", "--store", boltFixture(t))
	lines := strings.SplitAfter(strings.TrimSuffix(exported, "\n"), "\n")
	// Lines 1-2 are one batch; line 3 names a parent that exists nowhere.
	bad := strings.Replace(lines[2], `"parent":"layer-2"`, `"parent":"ghost"`, 1)
	input := lines[0] + lines[1] + bad + "\n" + lines[3]
	dst := filepath.Join(t.TempDir(), "a.db")
	r := snapmeta(t, input, nil, "import", "--store", dst, "--batch", "2")
	if r.code != 1 || !strings.Contains(r.stderr, "ghost") || !strings.Contains(r.stderr, "(2 imported before this)") {
		t.Fatalf("import: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	got := ok(t, "ls", "--store", dst)
	if strings.Count(got, "\n") != 3 {
		t.Errorf("want the first batch (2 snapshots) only:\n%s", got)
	}
}

// TestMigrate copies bbolt -> etcd -> bbolt, resumes an interrupted copy
// and refuses a target that differs.
func TestMigrate(t *testing.T) {
	src := boltFixture(t)
	c := etcdtest.Start(t)
	addr, _ := etcdStore(t, c, "migrated")

	r := exe(t, "migrate", "--from", src, "--to", addr, "--batch", "2")
	if r.code != 0 {
		t.Fatalf("migrate: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	golden(t, "migrate.golden", mask(strings.ReplaceAll(strings.ReplaceAll(r.stdout, src, "<SRC>"), addr, "<DST>")))
	if r.stderr != "" {
		t.Errorf("a short migrate shows no progress, yet stderr is %q", r.stderr)
	}
	want := ok(t, "export", "--store", src)
	if got := ok(t, "export", "--store", addr); got != want {
		t.Errorf("etcd copy differs\n--- got\n%s--- want\n%s", got, want)
	}

	// And back into a new bbolt file.
	back := filepath.Join(t.TempDir(), "back.db")
	if r := exe(t, "migrate", "--from", addr, "--to", "bolt://"+back); r.code != 0 {
		t.Fatalf("migrate back: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if got := ok(t, "export", "--store", back); got != want {
		t.Errorf("bbolt copy differs\n--- got\n%s--- want\n%s", got, want)
	}

	// Resume: a target holding the first 3 records (as an interrupted
	// migrate leaves it) is completed.
	partial := filepath.Join(t.TempDir(), "partial.db")
	first3 := strings.Join(strings.SplitAfter(want, "\n")[:3], "")
	snapmetaOK(t, first3, "import", "--store", partial)
	r = exe(t, "migrate", "--from", src, "--to", partial)
	if r.code != 0 || !strings.Contains(r.stdout, "(3 already there, resuming)") || !strings.Contains(r.stdout, "copied 4 snapshots, 3 were already there") {
		t.Fatalf("resume: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if got := ok(t, "export", "--store", partial); got != want {
		t.Errorf("resumed copy differs")
	}
	// Running it again copies nothing.
	if r := exe(t, "migrate", "--from", src, "--to", partial); r.code != 0 || !strings.Contains(r.stdout, "copied 0 snapshots, 7 were already there") {
		t.Errorf("second run: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// A real difference is refused before anything is written.
	differs := filepath.Join(t.TempDir(), "differs.db")
	snapmetaOK(t, strings.Replace(first3, `"size":1048576`, `"size":1048577`, 1), "import", "--store", differs)
	wantFail(t, exe(t, "migrate", "--from", src, "--to", differs), 1, `target has snapshot "layer-1" with a different record (source vs target: usage 1048576 bytes/100 inodes != 1048577 bytes/100 inodes)`)
	if got := ok(t, "ls", "--store", differs); strings.Count(got, "\n") != 4 {
		t.Errorf("a refused migrate wrote:\n%s", got)
	}
	// So is a target with snapshots the source lacks.
	wantFail(t, exe(t, "migrate", "--from", back, "--to", "bolt://"+boltWith(t, "stranger")), 1, `target has snapshot "stranger", which the source lacks`)
}

func snapmetaOK(t *testing.T, stdin string, args ...string) {
	t.Helper()
	if r := snapmeta(t, stdin, nil, args...); r.code != 0 {
		t.Fatalf("snapmeta %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
}

// boltWith returns a new bbolt file holding one active snapshot name.
func boltWith(t *testing.T, name string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "with.db")
	ms, err := storage.NewBoltMetaStore(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close()
	if err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestEtcdAuth: --user name:pass and SNAPMETA_PASSWORD log in; a wrong
// password or a user without permission fails in one line.
func TestEtcdAuth(t *testing.T) {
	c := etcdtest.Start(t)
	addr, ms := etcdStore(t, c, "team/snaps")
	fixture(t, ms)
	ms.Close()

	cli := c.Client(t)
	ctx := context.Background()
	steps := []func() error{
		func() error { _, err := cli.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := cli.RoleAdd(ctx, "root"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := cli.UserAdd(ctx, "alice", "alicepw"); return err },
		func() error { _, err := cli.RoleAdd(ctx, "team"); return err },
		func() error {
			_, err := cli.RoleGrantPermission(ctx, "team", "team/", clientv3.GetPrefixRangeEnd("team/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := cli.UserGrantRole(ctx, "alice", "team"); return err },
		func() error { _, err := cli.AuthEnable(ctx); return err },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}

	want := mask(ok(t, "ls", "--store", boltFixture(t)))
	if got := mask(ok(t, "ls", "--store", addr, "--user", "alice:alicepw")); got != want {
		t.Errorf("ls as alice:\n%s", got)
	}
	r := snapmeta(t, "", []string{"SNAPMETA_PASSWORD=alicepw"}, "check", "--store", addr, "--user", "alice")
	if r.code != 0 || r.stdout != "ok: 7 snapshots, no problems\n" {
		t.Errorf("check with SNAPMETA_PASSWORD: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	wantFail(t, exe(t, "ls", "--store", addr, "--user", "alice:wrong"), 1, "authentication failed")
	wantFail(t, exe(t, "ls", "--store", addr), 1, "user name is empty (the cluster requires a user: give --user)")
	other := strings.TrimSuffix(addr, "team/snaps") + "elsewhere"
	wantFail(t, exe(t, "check", "--store", other, "--user", "alice:alicepw"), 2, "permission denied")
}

// TestImportSplitsBatches: against an etcd that takes fewer operations per
// transaction than a batch needs, import and migrate split batches.
func TestImportSplitsBatches(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.WithMaxTxnOps(12))
	src := boltFixture(t)
	exported := ok(t, "export", "--store", src)
	addr, _ := etcdStore(t, c, "small")
	r := snapmeta(t, exported, nil, "import", "--store", addr, "--batch", "7")
	if r.code != 0 {
		t.Fatalf("import: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if got := ok(t, "export", "--store", addr); got != exported {
		t.Errorf("import with split batches differs\n--- got\n%s--- want\n%s", got, exported)
	}
	addr2, _ := etcdStore(t, c, "small2")
	if r := exe(t, "migrate", "--from", src, "--to", addr2, "--batch", "7"); r.code != 0 {
		t.Fatalf("migrate: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}
