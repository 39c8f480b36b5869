package overlaysnap_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
	"go.uber.org/goleak"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/snapmeta/storage/examples/overlaysnap"
)

// One embedded etcd serves every test of the binary; each snapshotter gets a
// root prefix of its own.
var (
	etcdOnce    sync.Once
	etcdCluster *etcdtest.Cluster
	etcdErr     error
	prefixSeq   atomic.Int64
)

// TestMain closes the shared etcd and fails the run if a goroutine outlives
// the tests: every snapshotter and store must be closed.
func TestMain(m *testing.M) {
	code := m.Run()
	if etcdCluster != nil {
		etcdCluster.Close()
	}
	if code == 0 {
		if err := goleak.Find(etcdtest.GoleakIgnores...); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

func sharedEtcd() (*etcdtest.Cluster, error) {
	etcdOnce.Do(func() { etcdCluster, etcdErr = etcdtest.New() })
	return etcdCluster, etcdErr
}

func uniquePrefix() string {
	return fmt.Sprintf("overlaysnap-test/%d", prefixSeq.Add(1))
}

func openBolt(root string) (storage.MetaStore, error) {
	return storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
}

// openBoltParallel opens a bbolt store whose WithTransaction callbacks run
// side by side (storage.WithParallelCallbacks).
func openBoltParallel(root string) (storage.MetaStore, error) {
	return storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"), storage.WithParallelCallbacks())
}

func openEtcd(_ string) (storage.MetaStore, error) {
	c, err := sharedEtcd()
	if err != nil {
		return nil, err
	}
	cfg := c.ClientConfig()
	return storage.NewEtcdStore(uniquePrefix(), &cfg)
}

func factory(open func(root string) (storage.MetaStore, error), opts ...overlaysnap.Opt) testsuite.SnapshotterFunc {
	return func(_ context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		ms, err := open(root)
		if err != nil {
			return nil, nil, err
		}
		sn, err := overlaysnap.New(root, ms, opts...)
		if err != nil {
			ms.Close()
			return nil, nil, err
		}
		return sn, sn.Close, nil
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("requires root for overlay and bind mounts")
	}
}

// containerd's own suite, on the default configuration. It does not call
// testutil.RequiresRoot (only the drivers' tests do), so no -test.root flag
// is needed. The suite is told it runs "overlayfs": it then knows that
// renaming a directory of a lower layer fails on overlayfs without
// redirect_dir (a kernel rule, documented in overlayfs.rst), and does not
// try.
func TestOverlayBolt(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, "overlayfs", factory(openBolt))
}

func TestOverlayBoltParallel(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, "overlayfs", factory(openBoltParallel))
}

func TestOverlayEtcd(t *testing.T) {
	requireRoot(t)
	if _, err := sharedEtcd(); err != nil {
		t.Fatal(err)
	}
	testsuite.SnapshotterSuite(t, "overlayfs", factory(openEtcd))
}

// The tests below need no root: they never mount, they look at mounts and
// directories.

// engines are the stores the tests below run on.
var engines = []struct {
	name string
	open func(root string) (storage.MetaStore, error)
}{
	{"Bolt", openBolt},
	{"BoltParallel", openBoltParallel},
	{"Etcd", openEtcd},
}

// newSnapshotter opens a snapshotter on a fresh root and a fresh store,
// wrapped by wrap if not nil.
func newSnapshotter(t *testing.T, open func(string) (storage.MetaStore, error), wrap func(storage.MetaStore) storage.MetaStore, opts ...overlaysnap.Opt) (snapshots.Snapshotter, string) {
	t.Helper()
	root := t.TempDir()
	ms, err := open(root)
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		ms = wrap(ms)
	}
	sn, err := overlaysnap.New(root, ms, opts...)
	if err != nil {
		ms.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	return sn, root
}

// upperOf returns the upper directory of the mounts of an active snapshot:
// the source of a bind mount, the upperdir of an overlay.
func upperOf(t *testing.T, ms []mount.Mount) string {
	t.Helper()
	if len(ms) != 1 {
		t.Fatalf("mounts = %+v, want one", ms)
	}
	if ms[0].Type == "bind" {
		return ms[0].Source
	}
	for _, o := range ms[0].Options {
		if dir, ok := strings.CutPrefix(o, "upperdir="); ok {
			return dir
		}
	}
	t.Fatalf("no upper directory in %+v", ms[0])
	return ""
}

// idOfUpper returns the snapshot ID that names the upper directory dir
// (<root>/snapshots/<id>/fs).
func idOfUpper(dir string) string {
	return filepath.Base(filepath.Dir(dir))
}

// snapshotDirs lists <root>/snapshots, sorted.
func snapshotDirs(t *testing.T, root string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func sorted(s ...string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// layer prepares key on parent, writes file into its upper directory, and
// commits it as name; it returns the layer's ID.
func layer(t *testing.T, sn snapshots.Snapshotter, name, parent, file string) string {
	t.Helper()
	ctx := context.Background()
	m, err := sn.Prepare(ctx, name+"-active", parent)
	if err != nil {
		t.Fatal(err)
	}
	upper := upperOf(t, m)
	if err := os.WriteFile(filepath.Join(upper, file), []byte(file+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, name, name+"-active"); err != nil {
		t.Fatal(err)
	}
	return idOfUpper(upper)
}

// newDir runs create and returns its mounts and the one directory it added
// under <root>/snapshots: the new snapshot's ID.
func newDir(t *testing.T, root string, create func() ([]mount.Mount, error)) ([]mount.Mount, string) {
	t.Helper()
	before := snapshotDirs(t, root)
	m, err := create()
	if err != nil {
		t.Fatal(err)
	}
	var added []string
	for _, d := range snapshotDirs(t, root) {
		if !slices.Contains(before, d) {
			added = append(added, d)
		}
	}
	if len(added) != 1 {
		t.Fatalf("directories added = %v, want one", added)
	}
	return m, added[0]
}

// TestMounts checks the mounts of each kind of snapshot against containerd's
// documented behaviour, and that the options WithMountOptions adds reach
// overlay mounts only.
func TestMounts(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			sn, root := newSnapshotter(t, eng.open, nil, overlaysnap.WithMountOptions("index=off"))
			ctx := context.Background()
			fsOf := func(id string) string { return filepath.Join(root, "snapshots", id, "fs") }
			base := layer(t, sn, "base", "", "base")
			top := layer(t, sn, "top", "base", "top")

			for _, tc := range []struct {
				key    string
				create func() ([]mount.Mount, error)
				want   func(id string) mount.Mount
			}{
				{
					"active-noparent",
					func() ([]mount.Mount, error) { return sn.Prepare(ctx, "active-noparent", "") },
					func(id string) mount.Mount {
						return mount.Mount{Type: "bind", Source: fsOf(id), Options: []string{"rbind", "rw"}}
					},
				},
				{
					"active-two-parents",
					func() ([]mount.Mount, error) { return sn.Prepare(ctx, "active-two-parents", "top") },
					func(id string) mount.Mount {
						return mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
							"index=off",
							"workdir=" + filepath.Join(root, "snapshots", id, "work"),
							"upperdir=" + fsOf(id),
							"lowerdir=" + fsOf(top) + ":" + fsOf(base),
						}}
					},
				},
				{
					"view-noparent",
					func() ([]mount.Mount, error) { return sn.View(ctx, "view-noparent", "") },
					func(id string) mount.Mount {
						return mount.Mount{Type: "bind", Source: fsOf(id), Options: []string{"rbind", "ro"}}
					},
				},
				{
					"view-one-parent",
					func() ([]mount.Mount, error) { return sn.View(ctx, "view-one-parent", "base") },
					func(string) mount.Mount {
						return mount.Mount{Type: "bind", Source: fsOf(base), Options: []string{"rbind", "ro"}}
					},
				},
				{
					"view-two-parents",
					func() ([]mount.Mount, error) { return sn.View(ctx, "view-two-parents", "top") },
					func(string) mount.Mount {
						return mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
							"index=off", "ro", "lowerdir=" + fsOf(top) + ":" + fsOf(base),
						}}
					},
				},
			} {
				m, id := newDir(t, root, tc.create)
				if want := []mount.Mount{tc.want(id)}; !slices.EqualFunc(m, want, mountEqual) {
					t.Errorf("%s: mounts = %+v, want %+v", tc.key, m, want)
				}
				again, err := sn.Mounts(ctx, tc.key)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.EqualFunc(m, again, mountEqual) {
					t.Errorf("%s: Mounts = %+v, creation returned %+v", tc.key, again, m)
				}
				if fi, err := os.Stat(fsOf(id)); err != nil || fi.Mode().Perm() != 0o755 {
					t.Errorf("%s: own fs directory: %v, %v; want mode 0755", tc.key, fi, err)
				}
			}

			if _, err := sn.Mounts(ctx, "top"); !errdefs.IsFailedPrecondition(err) {
				t.Errorf("Mounts of a committed snapshot = %v, want failed precondition", err)
			}
		})
	}
}

func mountEqual(a, b mount.Mount) bool {
	return a.Type == b.Type && a.Source == b.Source && slices.Equal(a.Options, b.Options)
}

func TestNewRefuses(t *testing.T) {
	ms, err := openBolt(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close()
	for name, call := range map[string]func() error{
		"nil store": func() error { _, err := overlaysnap.New(t.TempDir(), nil); return err },
		"no root":   func() error { _, err := overlaysnap.New("", ms); return err },
		"lowerdir option": func() error {
			_, err := overlaysnap.New(t.TempDir(), ms, overlaysnap.WithMountOptions("lowerdir=/x"))
			return err
		},
	} {
		if err := call(); !errdefs.IsInvalidArgument(err) {
			t.Errorf("New with %s = %v, want invalid argument", name, err)
		}
	}
}

// TestUpperdirLabel: with WithUpperdirLabel, every active snapshot carries
// the path of its upper directory, the one its mounts write to; an update
// does not take it away; views and committed snapshots have none. Without
// the option nothing carries it.
func TestUpperdirLabel(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			sn, _ := newSnapshotter(t, eng.open, nil, overlaysnap.WithUpperdirLabel())
			labelOf := func(key string) (string, bool) {
				t.Helper()
				info, err := sn.Stat(ctx, key)
				if err != nil {
					t.Fatal(err)
				}
				v, ok := info.Labels[overlaysnap.UpperdirLabel]
				return v, ok
			}

			layer(t, sn, "base", "", "base")
			for _, parent := range []string{"", "base"} {
				key := "active-on-" + parent
				m, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(map[string]string{"mine": "kept"}))
				if err != nil {
					t.Fatal(err)
				}
				upper := upperOf(t, m)
				info, err := sn.Stat(ctx, key)
				if err != nil {
					t.Fatal(err)
				}
				want := map[string]string{"mine": "kept", overlaysnap.UpperdirLabel: upper}
				if !maps.Equal(info.Labels, want) {
					t.Errorf("%s: labels = %v, want %v", key, info.Labels, want)
				}
				if fi, err := os.Stat(upper); err != nil || !fi.IsDir() {
					t.Errorf("%s: the labelled upper directory: %v", key, err)
				}
			}
			var walked int
			err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
				if got, _ := labelOf(info.Name); got != info.Labels[overlaysnap.UpperdirLabel] {
					t.Errorf("Walk shows %s with label %q, Stat %q", info.Name, info.Labels[overlaysnap.UpperdirLabel], got)
				}
				walked++
				return nil
			}, "kind==active")
			if err != nil || walked != 2 {
				t.Errorf("Walk of actives: %d, %v; want 2", walked, err)
			}

			// Updates replacing all labels, or removing this one, keep it.
			upper, _ := labelOf("active-on-")
			for _, fieldpaths := range [][]string{nil, {"labels"}, {"labels." + overlaysnap.UpperdirLabel}} {
				info := snapshots.Info{Name: "active-on-", Labels: map[string]string{"other": "x", overlaysnap.UpperdirLabel: "/elsewhere"}}
				if len(fieldpaths) == 1 && fieldpaths[0] != "labels" {
					info.Labels = nil
				}
				got, err := sn.Update(ctx, info, fieldpaths...)
				if err != nil {
					t.Fatal(err)
				}
				if got.Labels[overlaysnap.UpperdirLabel] != upper {
					t.Errorf("Update %v returned labels %v, want the label kept at %s", fieldpaths, got.Labels, upper)
				}
				if v, _ := labelOf("active-on-"); v != upper {
					t.Errorf("after Update %v the label is %q, want %s", fieldpaths, v, upper)
				}
			}

			if _, err := sn.View(ctx, "view", "base"); err != nil {
				t.Fatal(err)
			}
			if v, ok := labelOf("view"); ok {
				t.Errorf("a view carries the label %q", v)
			}
			if err := sn.Commit(ctx, "committed", "active-on-base"); err != nil {
				t.Fatal(err)
			}
			if v, ok := labelOf("committed"); ok {
				t.Errorf("a committed snapshot carries the label %q", v)
			}
			if v, ok := labelOf("base"); ok {
				t.Errorf("a committed snapshot carries the label %q", v)
			}

			plain, _ := newSnapshotter(t, eng.open, nil)
			if _, err := plain.Prepare(ctx, "active", ""); err != nil {
				t.Fatal(err)
			}
			if info, err := plain.Stat(ctx, "active"); err != nil || info.Labels != nil {
				t.Errorf("without WithUpperdirLabel: labels %v, %v; want none", info.Labels, err)
			}
		})
	}
}

// TestCleanup: Cleanup removes every directory no snapshot's ID names
// (stale IDs, abandoned temporary and removal directories) and keeps the
// live ones with their files.
func TestCleanup(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			sn, root := newSnapshotter(t, eng.open, nil)
			base := layer(t, sn, "base", "", "base")
			_, active := newDir(t, root, func() ([]mount.Mount, error) { return sn.Prepare(ctx, "active", "base") })
			_, view := newDir(t, root, func() ([]mount.Mount, error) { return sn.View(ctx, "view", "base") })
			_, gone := newDir(t, root, func() ([]mount.Mount, error) { return sn.Prepare(ctx, "gone", "") })
			if err := sn.Remove(ctx, "gone"); err != nil {
				t.Fatal(err)
			}
			live := sorted(base, active, view)
			if got := snapshotDirs(t, root); !slices.Equal(got, live) {
				t.Fatalf("directories = %v, want %v", got, live)
			}

			for _, orphan := range []string{gone, "999999", "new-123", "rm-7", "junk"} {
				if err := os.MkdirAll(filepath.Join(root, "snapshots", orphan, "fs", "deep"), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.WriteFile(filepath.Join(root, "snapshots", "stray-file"), nil, 0o644); err != nil {
				t.Fatal(err)
			}
			cleaner, ok := sn.(snapshots.Cleaner)
			if !ok {
				t.Fatal("the snapshotter is not a snapshots.Cleaner")
			}
			if err := cleaner.Cleanup(ctx); err != nil {
				t.Fatal(err)
			}
			if got := snapshotDirs(t, root); !slices.Equal(got, live) {
				t.Errorf("after Cleanup: directories = %v, want %v", got, live)
			}
			if b, err := os.ReadFile(filepath.Join(root, "snapshots", base, "fs", "base")); err != nil || string(b) != "base\n" {
				t.Errorf("base's file after Cleanup: %q, %v", b, err)
			}
			for _, key := range []string{"active", "view"} {
				if _, err := sn.Mounts(ctx, key); err != nil {
					t.Error(err)
				}
			}
			if err := sn.Commit(ctx, "child", "active"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// errRollback ends a transaction on purpose.
var errRollback = errors.New("rollback")

// TestLeftoverReplaced: a process killed between publishing a snapshot's
// directory and committing its transaction leaves <root>/snapshots/<id>, and
// bbolt hands that ID out again. The next Prepare or View given the ID
// replaces the leftover: its directory is new and empty, and nothing else is
// left behind. (etcd never hands out an ID twice.)
func TestLeftoverReplaced(t *testing.T) {
	for _, view := range []bool{false, true} {
		t.Run(map[bool]string{false: "Prepare", true: "View"}[view], func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			root := t.TempDir()
			ms, err := openBolt(root)
			if err != nil {
				t.Fatal(err)
			}
			sn, err := overlaysnap.New(root, ms, overlaysnap.WithUpperdirLabel())
			if err != nil {
				t.Fatal(err)
			}
			defer sn.Close()
			base := layer(t, sn, "base", "", "base")

			// The ID the next snapshot gets: a transaction that rolls back
			// gives it back.
			var next string
			err = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
				s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "probe", "")
				next = s.ID
				return errors.Join(err, errRollback)
			})
			if !errors.Is(err, errRollback) || next == "" {
				t.Fatalf("probe: %q, %v", next, err)
			}
			leftover := filepath.Join(root, "snapshots", next)
			for _, f := range []string{"fs/stale", "work/work/stale"} {
				if err := os.MkdirAll(filepath.Dir(filepath.Join(leftover, f)), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(leftover, f), []byte("stale\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}

			create := sn.Prepare
			if view {
				create = sn.View
			}
			if _, err := create(ctx, "fresh", ""); err != nil {
				t.Fatalf("create over a leftover: %v", err)
			}
			if got, want := snapshotDirs(t, root), sorted(base, next); !slices.Equal(got, want) {
				t.Errorf("directories = %v, want %v (the leftover replaced, nothing aside)", got, want)
			}
			for _, sub := range []string{"fs", "work"} {
				entries, err := os.ReadDir(filepath.Join(leftover, sub))
				if view && sub == "work" {
					if !errors.Is(err, os.ErrNotExist) {
						t.Errorf("a view has a work directory: %v, %v", entries, err)
					}
					continue
				}
				if err != nil || len(entries) != 0 {
					t.Errorf("%s of the new snapshot: %v, %v; want empty", sub, entries, err)
				}
			}
			if !view {
				info, err := sn.Stat(ctx, "fresh")
				if err != nil || info.Labels[overlaysnap.UpperdirLabel] != filepath.Join(leftover, "fs") {
					t.Errorf("label of the new snapshot: %v, %v; want %s", info.Labels, err, filepath.Join(leftover, "fs"))
				}
			}
		})
	}
}

// Failures and retries. faultyStore is a MetaStore whose writable commits
// fail on demand. It hands out its own Transactor through
// storage.ContextWithTransactor, so the driver's package-level calls reach
// it, and runs WithTransaction itself under the MetaStore contract:
// conflicts are retried until ctx ends.
type faultyStore struct {
	storage.MetaStore

	mu      sync.Mutex
	fault   fault
	commits int // commits attempted while fault was set
}

// fault says what the Commit of a writable transaction does: apply the
// transaction or not, then return err. A transaction not applied is rolled
// back, then then runs (if not nil).
type fault func(n int) (apply bool, then func(), err error)

var (
	errConflict    = fmt.Errorf("injected: %w", errdefs.ErrConflict)
	errUnavailable = fmt.Errorf("injected: %w", errdefs.ErrUnavailable)
)

func conflictFirst(k int) fault {
	return func(n int) (bool, func(), error) {
		if n <= k {
			return false, nil, errConflict
		}
		return true, nil, nil
	}
}

func (s *faultyStore) setFault(f fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fault, s.commits = f, 0
}

func (s *faultyStore) attempts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.commits
}

func (s *faultyStore) TransactionContext(ctx context.Context, writable bool) (context.Context, storage.Transactor, error) {
	_, tx, err := s.MetaStore.TransactionContext(ctx, writable)
	if err != nil {
		return ctx, nil, err
	}
	ft := &faultyTx{Transactor: tx, s: s}
	return storage.ContextWithTransactor(ctx, ft), ft, nil
}

func (s *faultyStore) WithTransaction(ctx context.Context, writable bool, fn storage.TransactionCallback) error {
	for {
		err := s.runOnce(ctx, writable, fn)
		if err == nil || !errdefs.IsConflict(err) || ctx.Err() != nil {
			return err
		}
	}
}

func (s *faultyStore) runOnce(ctx context.Context, writable bool, fn storage.TransactionCallback) error {
	tctx, tx, err := s.TransactionContext(ctx, writable)
	if err != nil {
		return err
	}
	if err := fn(tctx); err != nil {
		tx.Rollback()
		return err
	}
	if !writable {
		return tx.Rollback()
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit failed: %w", err)
	}
	return nil
}

type faultyTx struct {
	storage.Transactor
	s *faultyStore
}

func (t *faultyTx) Commit() error {
	t.s.mu.Lock()
	f := t.s.fault
	if f != nil {
		t.s.commits++
	}
	n := t.s.commits
	t.s.mu.Unlock()
	if f == nil {
		return t.Transactor.Commit()
	}
	apply, then, err := f(n)
	if !apply {
		t.Transactor.Rollback()
		if then != nil {
			then()
		}
		return err
	}
	if cerr := t.Transactor.Commit(); cerr != nil {
		return cerr
	}
	return err
}

// faulty returns a snapshotter on a faulty store over a fresh store of
// open, with a committed snapshot "base" holding the file "base"; and its
// root and base's ID.
func faulty(t *testing.T, open func(string) (storage.MetaStore, error), opts ...overlaysnap.Opt) (snapshots.Snapshotter, *faultyStore, string, string) {
	t.Helper()
	var fs *faultyStore
	sn, root := newSnapshotter(t, open, func(ms storage.MetaStore) storage.MetaStore {
		fs = &faultyStore{MetaStore: ms}
		return fs
	}, opts...)
	return sn, fs, root, layer(t, sn, "base", "", "base")
}

// TestCreateCommitFailure forces the metadata transaction of Prepare and
// View to fail at Commit, and checks that the error is returned and that no
// directory and no metadata are left.
func TestCreateCommitFailure(t *testing.T) {
	for _, eng := range engines {
		for _, fc := range []struct {
			name  string
			err   error
			class func(error) bool
		}{
			{"Conflict", errConflict, errdefs.IsConflict},
			{"Unavailable", errUnavailable, errdefs.IsUnavailable},
		} {
			for _, op := range []struct {
				name   string
				parent string
				view   bool
			}{
				{"Prepare", "", false},
				{"PrepareOnParent", "base", false},
				{"View", "", true},
				{"ViewOnParent", "base", true},
			} {
				t.Run(eng.name+"/"+fc.name+"/"+op.name, func(t *testing.T) {
					t.Parallel()
					sn, fs, root, baseID := faulty(t, eng.open, overlaysnap.WithUpperdirLabel())
					// A conflict is retried until ctx ends: end it at the
					// third attempt, so the last error is that conflict.
					ctx, cancel := context.WithCancel(context.Background())
					defer cancel()
					fs.setFault(func(n int) (bool, func(), error) {
						if n == 3 {
							cancel()
						}
						return false, nil, fc.err
					})
					create := sn.Prepare
					if op.view {
						create = sn.View
					}
					_, err := create(ctx, "doomed", op.parent)
					if err == nil || !fc.class(err) {
						t.Fatalf("create = %v, want an error of the injected class (%v)", err, fc.err)
					}
					if n, want := fs.attempts(), map[bool]int{true: 3, false: 1}[fc.err == errConflict]; n != want {
						t.Errorf("%d commit attempts, want %d", n, want)
					}
					if got := snapshotDirs(t, root); !slices.Equal(got, []string{baseID}) {
						t.Errorf("snapshot directories = %v, want only base's [%s]", got, baseID)
					}
					if _, err := sn.Stat(context.Background(), "doomed"); !errdefs.IsNotFound(err) {
						t.Errorf("Stat after failed create = %v, want not found", err)
					}

					// The same call now succeeds.
					fs.setFault(nil)
					if _, err := create(context.Background(), "doomed", op.parent); err != nil {
						t.Fatal(err)
					}
				})
			}
		}
	}
}

// TestCommitOutcomeUnknown: Commit applied the transaction but reported an
// error (a timeout after etcd applied it). Prepare sees the snapshot there
// with its ID, keeps its directory and succeeds.
func TestCommitOutcomeUnknown(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			sn, fs, root, baseID := faulty(t, eng.open)
			fs.setFault(func(int) (bool, func(), error) { return true, nil, errUnavailable })
			m, err := sn.Prepare(context.Background(), "child", "base")
			if err != nil {
				t.Fatalf("Prepare = %v, want success", err)
			}
			fs.setFault(nil)
			id := idOfUpper(upperOf(t, m))
			if got, want := snapshotDirs(t, root), sorted(baseID, id); !slices.Equal(got, want) {
				t.Errorf("snapshot directories = %v, want %v", got, want)
			}
			again, err := sn.Mounts(context.Background(), "child")
			if err != nil || !slices.EqualFunc(again, m, mountEqual) {
				t.Errorf("Mounts = %+v, %v; Prepare returned %+v", again, err, m)
			}
		})
	}
}

// TestRetriedAfterConflict: the first commits lose a race; Prepare, Commit
// and Remove run again and leave exactly the directories of the snapshots
// that exist, and the label names the directory the mounts use.
func TestRetriedAfterConflict(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			sn, fs, root, baseID := faulty(t, eng.open, overlaysnap.WithUpperdirLabel())
			ctx := context.Background()

			fs.setFault(conflictFirst(3))
			m, err := sn.Prepare(ctx, "child", "base")
			if err != nil {
				t.Fatal(err)
			}
			if n := fs.attempts(); n != 4 {
				t.Errorf("%d commit attempts, want 4", n)
			}
			upper := upperOf(t, m)
			id := idOfUpper(upper)
			if got, want := snapshotDirs(t, root), sorted(baseID, id); !slices.Equal(got, want) {
				t.Errorf("snapshot directories = %v, want %v", got, want)
			}
			info, err := sn.Stat(ctx, "child")
			if err != nil || info.Labels[overlaysnap.UpperdirLabel] != upper {
				t.Errorf("label = %v, %v; want %s", info.Labels, err, upper)
			}
			if err := os.WriteFile(filepath.Join(upper, "hello"), []byte("hello\n"), 0o644); err != nil {
				t.Fatal(err)
			}

			fs.setFault(conflictFirst(2))
			if err := sn.Commit(ctx, "child-committed", "child"); err != nil {
				t.Fatal(err)
			}
			u, err := sn.Usage(ctx, "child-committed")
			if err != nil {
				t.Fatal(err)
			}
			if u.Inodes < 2 || u.Size < int64(len("hello\n")) {
				t.Errorf("usage of committed child = %+v, want the directory and its file", u)
			}

			fs.setFault(conflictFirst(2))
			if err := sn.Remove(ctx, "child-committed"); err != nil {
				t.Fatal(err)
			}
			if got := snapshotDirs(t, root); !slices.Equal(got, []string{baseID}) {
				t.Errorf("snapshot directories after Remove = %v, want [%s]", got, baseID)
			}
		})
	}
}

// TestFailedPrepareSparesNextOwner: on bbolt the ID of a Prepare whose
// commit failed is handed out again at once, possibly before that Prepare
// has removed the directory it published. The next Prepare given the ID
// must neither take that directory for a leftover nor have its own removed
// by the failed Prepare's cleanup.
func TestFailedPrepareSparesNextOwner(t *testing.T) {
	t.Parallel()
	sn, fs, root, baseID := faulty(t, openBolt)
	ctx := context.Background()
	var (
		wg       sync.WaitGroup
		mounts   []mount.Mount
		nextErr  error
		failedID string // the directory the failed Prepare published
	)
	fs.setFault(func(n int) (bool, func(), error) {
		if n > 1 {
			return true, nil, nil
		}
		// The failed transaction has been rolled back; start the next
		// Prepare, and give it time to be given the same ID, before the
		// failed one goes on to remove its directory.
		return false, func() {
			for _, d := range snapshotDirs(t, root) {
				if d != baseID && !strings.HasPrefix(d, "new-") {
					failedID = d
				}
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				mounts, nextErr = sn.Prepare(ctx, "next", "base")
			}()
			time.Sleep(100 * time.Millisecond)
		}, errUnavailable
	})
	if _, err := sn.Prepare(ctx, "failed", "base"); !errdefs.IsUnavailable(err) {
		t.Fatalf("Prepare = %v, want the injected error", err)
	}
	wg.Wait()
	if nextErr != nil {
		t.Fatal(nextErr)
	}
	upper := upperOf(t, mounts)
	if fi, err := os.Stat(upper); err != nil || !fi.IsDir() {
		t.Fatalf("the next Prepare's upper directory: %v", err)
	}
	if id := idOfUpper(upper); id != failedID {
		t.Errorf("the next Prepare got ID %s, the failed one %q: the test did not race", id, failedID)
	}
	if got, want := snapshotDirs(t, root), sorted(baseID, failedID); !slices.Equal(got, want) {
		t.Errorf("snapshot directories = %v, want %v", got, want)
	}
}
