package nativesnap_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/snapmeta/storage/examples/nativesnap"
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
	return fmt.Sprintf("nativesnap-test/%d", prefixSeq.Add(1))
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

func factory(open func(root string) (storage.MetaStore, error)) testsuite.SnapshotterFunc {
	return func(_ context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		ms, err := open(root)
		if err != nil {
			return nil, nil, err
		}
		sn, err := nativesnap.New(root, ms)
		if err != nil {
			ms.Close()
			return nil, nil, err
		}
		return sn, sn.Close, nil
	}
}

var (
	newBolt = factory(openBolt)
	newEtcd = factory(openEtcd)
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("requires root for bind mounts")
	}
}

// containerd's own suite. It does not call testutil.RequiresRoot (only the
// drivers' tests do), so no -test.root flag is needed.
func TestNativeBolt(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, "NativeBolt", newBolt)
}

func TestNativeBoltParallel(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, "NativeBoltParallel", factory(openBoltParallel))
}

func TestNativeEtcd(t *testing.T) {
	requireRoot(t)
	if _, err := sharedEtcd(); err != nil {
		t.Fatal(err)
	}
	testsuite.SnapshotterSuite(t, "NativeEtcd", newEtcd)
}

// engines are the stores the failure tests run on.
var engines = []struct {
	name string
	open func(root string) (storage.MetaStore, error)
}{
	{"Bolt", openBolt},
	{"BoltParallel", openBoltParallel},
	{"Etcd", openEtcd},
}

// The failure tests below need no root: they never mount, they look at the
// directories directly.

// fault says what the Commit of a writable transaction does: apply the
// transaction or not, then return err (if apply and the real Commit fails,
// its error).
type fault func(n int) (apply bool, err error)

var (
	errConflict    = fmt.Errorf("injected: %w", errdefs.ErrConflict)
	errUnavailable = fmt.Errorf("injected: %w", errdefs.ErrUnavailable)
)

// faultyStore is a MetaStore whose writable commits fail on demand. It hands
// out its own Transactor through storage.ContextWithTransactor, so the
// driver's package-level calls reach it, and runs WithTransaction itself
// under the MetaStore contract: conflicts are retried until ctx ends.
type faultyStore struct {
	storage.MetaStore

	mu      sync.Mutex
	fault   fault
	commits int // commits attempted while fault was set
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
	apply, err := f(n)
	if !apply {
		t.Transactor.Rollback()
		return err
	}
	if cerr := t.Transactor.Commit(); cerr != nil {
		return cerr
	}
	return err
}

func conflictFirst(k int) fault {
	return func(n int) (bool, error) {
		if n <= k {
			return false, errConflict
		}
		return true, nil
	}
}

// snapshotDirs lists <root>/snapshots.
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

// idOf returns the directory name of an active snapshot's mount, or a
// view's.
func idOf(t *testing.T, sn snapshots.Snapshotter, key string) string {
	t.Helper()
	m, err := sn.Mounts(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Base(m[0].Source)
}

// setup returns a snapshotter on a faulty store with a committed snapshot
// "base" holding the file "hello", and the ID of base's directory.
func setup(t *testing.T, open func(string) (storage.MetaStore, error)) (snapshots.Snapshotter, *faultyStore, string, string) {
	t.Helper()
	root := t.TempDir()
	ms, err := open(root)
	if err != nil {
		t.Fatal(err)
	}
	fs := &faultyStore{MetaStore: ms}
	sn, err := nativesnap.New(root, fs)
	if err != nil {
		ms.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })

	ctx := context.Background()
	m, err := sn.Prepare(ctx, "base-active", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(m[0].Source, "hello"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	baseID := filepath.Base(m[0].Source)
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	return sn, fs, root, baseID
}

// TestPrepareCommitFailure forces the metadata transaction of Prepare and
// View to fail at Commit, and checks that the error is returned, no
// directory is left under <root>/snapshots and no metadata either.
func TestPrepareCommitFailure(t *testing.T) {
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
					sn, fs, root, baseID := setup(t, eng.open)
					// A conflict is retried until ctx ends: end it at the
					// third attempt, so the last error is that conflict.
					ctx, cancel := context.WithCancel(context.Background())
					defer cancel()
					fs.setFault(func(n int) (bool, error) {
						if n == 3 {
							cancel()
						}
						return false, fc.err
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

					// The store is clean: the same call now succeeds.
					fs.setFault(nil)
					m, err := create(context.Background(), "doomed", op.parent)
					if err != nil {
						t.Fatal(err)
					}
					if _, err := os.Stat(m[0].Source); err != nil {
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
			sn, fs, root, baseID := setup(t, eng.open)
			fs.setFault(func(int) (bool, error) { return true, errUnavailable })
			m, err := sn.Prepare(context.Background(), "child", "base")
			if err != nil {
				t.Fatalf("Prepare = %v, want success", err)
			}
			fs.setFault(nil)
			if _, err := os.Stat(filepath.Join(m[0].Source, "hello")); err != nil {
				t.Fatal(err)
			}
			id := idOf(t, sn, "child")
			want := []string{baseID, id}
			slices.Sort(want)
			if got := snapshotDirs(t, root); !slices.Equal(got, want) {
				t.Errorf("snapshot directories = %v, want %v", got, want)
			}
		})
	}
}

// TestRetriedAfterConflict: the first commits lose a race; Prepare, Commit
// and Remove run again and leave exactly the directories of the snapshots
// that exist.
func TestRetriedAfterConflict(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			t.Parallel()
			sn, fs, root, baseID := setup(t, eng.open)
			ctx := context.Background()

			fs.setFault(conflictFirst(3))
			m, err := sn.Prepare(ctx, "child", "base")
			if err != nil {
				t.Fatal(err)
			}
			if n := fs.attempts(); n != 4 {
				t.Errorf("%d commit attempts, want 4", n)
			}
			if b, err := os.ReadFile(filepath.Join(m[0].Source, "hello")); err != nil || string(b) != "hello\n" {
				t.Fatalf("parent's file in child = %q, %v", b, err)
			}
			id := idOf(t, sn, "child")
			if m[0].Source != filepath.Join(root, "snapshots", id) {
				t.Errorf("Prepare's mount %s is not the stored snapshot's directory %s", m[0].Source, id)
			}
			want := []string{baseID, id}
			slices.Sort(want)
			if got := snapshotDirs(t, root); !slices.Equal(got, want) {
				t.Errorf("snapshot directories = %v, want %v", got, want)
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

// Real races on etcd: a second host, sharing the store, writes between this
// host's reads and its commit.

// hookKV runs hook once, just before the first commit that writes the
// snapshot key named target.
type hookKV struct {
	clientv3.KV
	target string
	once   *sync.Once
	hook   func()
}

func (k hookKV) Txn(ctx context.Context) clientv3.Txn {
	return &hookTxn{inner: k.KV.Txn(ctx), kv: k}
}

type hookTxn struct {
	inner clientv3.Txn
	kv    hookKV
	ops   []clientv3.Op
}

func (t *hookTxn) If(cs ...clientv3.Cmp) clientv3.Txn {
	t.inner = t.inner.If(cs...)
	return t
}

func (t *hookTxn) Then(ops ...clientv3.Op) clientv3.Txn {
	t.ops = append(t.ops, ops...)
	t.inner = t.inner.Then(ops...)
	return t
}

func (t *hookTxn) Else(ops ...clientv3.Op) clientv3.Txn {
	t.inner = t.inner.Else(ops...)
	return t
}

func (t *hookTxn) Commit() (*clientv3.TxnResponse, error) {
	for _, op := range t.ops {
		if op.IsPut() && strings.HasSuffix(string(op.KeyBytes()), "/"+storage.KeyEtcdSnapshots+"/"+t.kv.target) {
			t.kv.once.Do(t.kv.hook)
			break
		}
	}
	return t.inner.Commit()
}

// racingHosts returns this host's snapshotter, on a store whose commit of
// target first runs race(other), other being a second host's store on the
// same root prefix; and this host's root and base's directory name.
func racingHosts(t *testing.T, target string, race func(other storage.MetaStore)) (snapshots.Snapshotter, string, string) {
	t.Helper()
	c, err := sharedEtcd()
	if err != nil {
		t.Fatal(err)
	}
	prefix := uniquePrefix()
	cfg := c.ClientConfig()
	other, err := storage.NewEtcdStore(prefix, &cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })

	var once sync.Once
	wrap := storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV {
		return hookKV{KV: kv, target: target, once: &once, hook: func() { race(other) }}
	})
	root := t.TempDir()
	sn, baseID := func() (snapshots.Snapshotter, string) {
		ms, err := storage.NewEtcdStore(prefix, &cfg, wrap)
		if err != nil {
			t.Fatal(err)
		}
		sn, err := nativesnap.New(root, ms)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sn.Close() })
		ctx := context.Background()
		m, err := sn.Prepare(ctx, "base-active", "")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(m[0].Source, "hello"), []byte("hello\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := sn.Commit(ctx, "base", "base-active"); err != nil {
			t.Fatal(err)
		}
		return sn, filepath.Base(m[0].Source)
	}()
	return sn, root, baseID
}

// TestEtcdOtherHostTakesKey: another host creates the same key between this
// host's read and its commit. The commit conflicts, the retry finds the key
// taken, Prepare fails with AlreadyExists and leaves no directory.
func TestEtcdOtherHostTakesKey(t *testing.T) {
	t.Parallel()
	var otherID string
	sn, root, baseID := racingHosts(t, "contested", func(other storage.MetaStore) {
		err := other.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "contested", "base")
			otherID = s.ID
			return err
		})
		if err != nil {
			t.Error(err)
		}
	})
	_, err := sn.Prepare(context.Background(), "contested", "base")
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare = %v, want already exists", err)
	}
	if otherID == "" {
		t.Fatal("the other host did not race")
	}
	if got := snapshotDirs(t, root); !slices.Equal(got, []string{baseID}) {
		t.Errorf("snapshot directories = %v, want only base's [%s]", got, baseID)
	}
	info, err := sn.Stat(context.Background(), "contested")
	if err != nil || info.Kind != snapshots.KindActive {
		t.Errorf("Stat(contested) = %+v, %v; want the other host's active snapshot", info, err)
	}
}

// TestEtcdOtherHostChangesParent: another host relabels the parent between
// this host's read and its commit. The commit conflicts, the retry gets a
// new ID, and the directory ends up under that ID only.
func TestEtcdOtherHostChangesParent(t *testing.T) {
	t.Parallel()
	raced := false
	sn, root, baseID := racingHosts(t, "child", func(other storage.MetaStore) {
		raced = true
		err := other.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"touched": "yes"}})
			return err
		})
		if err != nil {
			t.Error(err)
		}
	})
	m, err := sn.Prepare(context.Background(), "child", "base")
	if err != nil {
		t.Fatal(err)
	}
	if !raced {
		t.Fatal("the other host did not race")
	}
	id := idOf(t, sn, "child")
	if m[0].Source != filepath.Join(root, "snapshots", id) {
		t.Errorf("Prepare's mount %s is not the stored snapshot's directory %s", m[0].Source, id)
	}
	if b, err := os.ReadFile(filepath.Join(m[0].Source, "hello")); err != nil || string(b) != "hello\n" {
		t.Fatalf("parent's file in child = %q, %v", b, err)
	}
	want := []string{baseID, id}
	slices.Sort(want)
	if got := snapshotDirs(t, root); !slices.Equal(got, want) {
		t.Errorf("snapshot directories = %v, want %v", got, want)
	}
	info, err := sn.Stat(context.Background(), "base")
	if err != nil || info.Labels["touched"] != "yes" {
		t.Errorf("Stat(base) = %+v, %v; want the other host's label", info, err)
	}
}

// TestBoltParallelDriverUnderConcurrency runs the driver on a bbolt store
// with parallel callbacks while its Prepares race: many at once on one
// parent, several for one key, and with removals of their parents. Every
// answer is a serial store's (one Prepare of a key succeeds, the others get
// AlreadyExists; a parent is removed exactly when no Prepare on it
// succeeded), every successful Prepare's directory exists, no directory is
// left that no snapshot owns, and the store checks clean.
func TestBoltParallelDriverUnderConcurrency(t *testing.T) {
	root := t.TempDir()
	ms, err := openBoltParallel(root)
	if err != nil {
		t.Fatal(err)
	}
	sn, err := nativesnap.New(root, ms)
	if err != nil {
		_ = ms.Close()
		t.Fatal(err)
	}
	defer sn.Close()
	ctx := context.Background()
	layer := func(name, parent string) error {
		if _, err := sn.Prepare(ctx, name+"-a", parent); err != nil {
			return err
		}
		return sn.Commit(ctx, name, name+"-a")
	}
	if err := layer("base", ""); err != nil {
		t.Fatal(err)
	}
	const parents = 4
	for p := range parents {
		if err := layer(fmt.Sprintf("p%d", p), "base"); err != nil {
			t.Fatal(err)
		}
	}
	var (
		wg              sync.WaitGroup
		sameOK, sameDup atomic.Int32
		onParent        [parents]atomic.Int32
		removed         [parents]atomic.Bool
	)
	gate := make(chan struct{})
	for i := range 16 {
		wg.Go(func() {
			<-gate
			if err := layer(fmt.Sprintf("l%d", i), "base"); err != nil {
				t.Errorf("layer %d: %v", i, err)
			}
		})
	}
	for range 6 {
		wg.Go(func() {
			<-gate
			_, err := sn.Prepare(ctx, "same", "base")
			switch {
			case err == nil:
				sameOK.Add(1)
			case errdefs.IsAlreadyExists(err):
				sameDup.Add(1)
			default:
				t.Errorf("Prepare(same): %v", err)
			}
		})
	}
	for p := range parents {
		parent := fmt.Sprintf("p%d", p)
		wg.Go(func() {
			<-gate
			err := sn.Remove(ctx, parent)
			switch {
			case err == nil:
				removed[p].Store(true)
			case errdefs.IsFailedPrecondition(err):
			default:
				t.Errorf("Remove(%s): %v", parent, err)
			}
		})
		for c := range 3 {
			wg.Go(func() {
				<-gate
				_, err := sn.Prepare(ctx, fmt.Sprintf("%s-c%d", parent, c), parent)
				switch {
				case err == nil:
					onParent[p].Add(1)
				case errdefs.IsNotFound(err):
				default:
					t.Errorf("Prepare on %s: %v", parent, err)
				}
			})
		}
	}
	close(gate)
	wg.Wait()
	if sameOK.Load() != 1 || sameDup.Load() != 5 {
		t.Errorf("Prepare(same): %d succeeded, %d AlreadyExists; want 1 and 5", sameOK.Load(), sameDup.Load())
	}
	for p := range parents {
		if removed[p].Load() != (onParent[p].Load() == 0) {
			t.Errorf("p%d: removed %v with %d children prepared", p, removed[p].Load(), onParent[p].Load())
		}
	}
	var ids map[string]string
	if err := ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		ids, err = storage.IDMap(ctx)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	onDisk := map[string]bool{}
	for _, e := range entries {
		onDisk[e.Name()] = true
		if _, ok := ids[e.Name()]; !ok {
			t.Errorf("directory %s belongs to no snapshot", e.Name())
		}
	}
	for id, name := range ids {
		if !onDisk[id] {
			t.Errorf("snapshot %s (ID %s) has no directory", name, id)
		}
	}
	problems, err := storage.Check(ctx, ms)
	if err != nil || len(problems) > 0 {
		t.Fatalf("Check: %v %v", problems, err)
	}
}
