// Package drivers_test runs the shapes of real snapshotter drivers on this
// library over etcd while other clients churn the same store, and counts
// what a driver author would see: callbacks run again, snapshots whose
// directory is missing, directories no snapshot owns.
package drivers_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/snapmeta/storage/examples/nativesnap"
)

// TestMain fails the run if a goroutine outlives the tests: every store,
// client and server must be closed.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(etcdtest.GoleakIgnores...); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// Workload of one driver: children of one parent, and a chain grown on it.
const (
	childPrepares = 100
	chainLength   = 5
)

// counts is what one driver run saw.
type counts struct {
	prepares    int64 // successful Prepares
	failed      int64 // Prepares that returned an error
	retries     int64 // Prepare callbacks run beyond the first
	commitRuns  int64 // Commit callbacks run beyond the first
	lost        int64 // etcd commits that lost a race (every engine retry)
	missing     int   // a Prepare succeeded, its directory is not there
	orphaned    int   // directories whose name is no snapshot's ID
	unexplained int   // orphans not left by an attempt that lost (erofs-like)
}

// driver is one snapshotter shape, on the library's public API and a data
// directory root/snapshots/<ID>.
type driver interface {
	prepare(ctx context.Context, key, parent string) (id string, err error)
	commit(ctx context.Context, name, key string) error
	// leftovers are the IDs of directories made by attempts that lost.
	leftovers() map[string]bool
	close() error
}

// fsDriver holds what the hand-written shapes share.
type fsDriver struct {
	root       string
	ms         storage.MetaStore
	retries    atomic.Int64
	commitRuns atomic.Int64

	mu   sync.Mutex
	left map[string]bool
}

func (d *fsDriver) dir(id string) string { return filepath.Join(d.root, "snapshots", id) }

func (d *fsDriver) tempDir() (string, error) {
	return os.MkdirTemp(filepath.Join(d.root, "snapshots"), "new-")
}

func (d *fsDriver) leftovers() map[string]bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.left
}

func (d *fsDriver) leave(ids ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.left == nil {
		d.left = map[string]bool{}
	}
	for _, id := range ids {
		d.left[id] = true
	}
}

func (d *fsDriver) close() error { return d.ms.Close() }

// counters returns the Prepare and Commit callbacks run beyond the first.
func (d *fsDriver) counters() (prepare, commit int64) {
	return d.retries.Load(), d.commitRuns.Load()
}

// commit is containerd's Commit: stat the active (for its usage), then
// CommitActive, in one transaction.
func (d *fsDriver) commit(ctx context.Context, name, key string) error {
	runs := 0
	err := d.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		runs++
		if _, _, _, err := storage.GetInfo(ctx, key); err != nil {
			return err
		}
		_, err := storage.CommitActive(ctx, key, name, snapshots.Usage{})
		return err
	})
	d.commitRuns.Add(int64(runs - 1))
	return err
}

// nativeLike is containerd's native snapshotter: the directory is made
// before the transaction and renamed to its ID inside the callback.
type nativeLike struct{ fsDriver }

func (d *nativeLike) prepare(ctx context.Context, key, parent string) (string, error) {
	td, err := d.tempDir()
	if err != nil {
		return "", err
	}
	var s storage.Snapshot
	runs := 0
	err = d.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		runs++
		if s, err = storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent); err != nil {
			return err
		}
		return os.Rename(td, d.dir(s.ID))
	})
	d.retries.Add(int64(runs - 1))
	if err != nil {
		_ = os.RemoveAll(td) // as containerd: the temporary name only
		return "", err
	}
	return s.ID, nil
}

// erofsLike reads every ancestor's info inside the callback, then creates
// the snapshot and its directory there.
type erofsLike struct{ fsDriver }

func (d *erofsLike) prepare(ctx context.Context, key, parent string) (string, error) {
	var (
		s    storage.Snapshot
		made []string
	)
	err := d.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		for name := parent; name != ""; {
			_, info, _, err := storage.GetInfo(ctx, name)
			if err != nil {
				return err
			}
			name = info.Parent
		}
		if s, err = storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent); err != nil {
			return err
		}
		if err := os.Mkdir(d.dir(s.ID), 0o700); err != nil {
			return err
		}
		made = append(made, s.ID)
		return nil
	})
	if len(made) > 0 {
		d.retries.Add(int64(len(made) - 1))
	}
	if err != nil {
		d.leave(made...)
		return "", err
	}
	d.leave(made[:len(made)-1]...)
	return s.ID, nil
}

// overlayLike makes the directory before the transaction and renames it to
// its ID after the commit: nothing on disk happens inside the callback.
type overlayLike struct{ fsDriver }

func (d *overlayLike) prepare(ctx context.Context, key, parent string) (string, error) {
	td, err := d.tempDir()
	if err != nil {
		return "", err
	}
	var s storage.Snapshot
	runs := 0
	err = d.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		runs++
		s, err = storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent)
		return err
	})
	d.retries.Add(int64(runs - 1))
	if err != nil {
		_ = os.RemoveAll(td)
		return "", err
	}
	return s.ID, os.Rename(td, d.dir(s.ID))
}

// nativesnapDriver drives examples/nativesnap; its callbacks are its own,
// so its retries are counted as lost etcd commits.
type nativesnapDriver struct{ sn snapshots.Snapshotter }

func (d nativesnapDriver) prepare(ctx context.Context, key, parent string) (string, error) {
	mounts, err := d.sn.Prepare(ctx, key, parent)
	if err != nil {
		return "", err
	}
	return filepath.Base(mounts[0].Source), nil
}

func (d nativesnapDriver) commit(ctx context.Context, name, key string) error {
	return d.sn.Commit(ctx, name, key)
}

func (nativesnapDriver) leftovers() map[string]bool { return nil }
func (d nativesnapDriver) close() error             { return d.sn.Close() }

// lostKV counts etcd transactions that did not succeed: every one is a
// commit whose guard failed, that is a lost race.
type lostKV struct {
	clientv3.KV
	lost *atomic.Int64
}

func (k lostKV) Txn(ctx context.Context) clientv3.Txn { return lostTxn{k.KV.Txn(ctx), k.lost} }

type lostTxn struct {
	clientv3.Txn
	lost *atomic.Int64
}

func (t lostTxn) If(cs ...clientv3.Cmp) clientv3.Txn   { return lostTxn{t.Txn.If(cs...), t.lost} }
func (t lostTxn) Then(ops ...clientv3.Op) clientv3.Txn { return lostTxn{t.Txn.Then(ops...), t.lost} }
func (t lostTxn) Else(ops ...clientv3.Op) clientv3.Txn { return lostTxn{t.Txn.Else(ops...), t.lost} }
func (t lostTxn) Commit() (*clientv3.TxnResponse, error) {
	resp, err := t.Txn.Commit()
	if err == nil && !resp.Succeeded {
		t.lost.Add(1)
	}
	return resp, err
}

// parentSet is the committed parents the driver has made so far, for the
// relabelling churn.
type parentSet struct {
	mu    sync.Mutex
	names []string
}

func (p *parentSet) add(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.names = append(p.names, name)
}

func (p *parentSet) pick() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.names[rand.IntN(len(p.names))]
}

// pickLayer picks a chain layer, P while there is none.
func (p *parentSet) pickLayer() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.names) == 1 {
		return p.names[0]
	}
	return p.names[1+rand.IntN(len(p.names)-1)]
}

// churn runs other clients on the store until stop: relabels of the
// parents (P and a chain layer in turn), siblings of the children created,
// committed and removed, and Stat, Usage and Walk traffic. Each client takes
// one step per beat, at once, so that its step overlaps the driver's
// Prepare that beat; a client still busy lets beats pass. The churn thus
// keeps pace with the driver on any machine, and a relabel can conflict
// with at most one attempt of the Prepare it overlaps.
func churn(ctx context.Context, t *testing.T, cfg clientv3.Config, prefix string, parents *parentSet, children func() []string) (beat, stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var (
		wg    sync.WaitGroup
		beats []chan struct{}
	)
	run := func(name string, step func(ctx context.Context, ms storage.MetaStore, i int) error) {
		ms, err := storage.NewEtcdStore(prefix, &cfg)
		require.NoError(t, err)
		b := make(chan struct{}, 1)
		beats = append(beats, b)
		wg.Go(func() {
			defer ms.Close()
			for i := 0; ; i++ {
				select {
				case <-ctx.Done():
					return
				case <-b:
				}
				if err := step(ctx, ms, i); err != nil && ctx.Err() == nil {
					assert.NoError(t, err, "churn %s", name)
					return
				}
			}
		})
	}
	relabel := func(ctx context.Context, ms storage.MetaStore, name, value string) error {
		return ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: name, Labels: map[string]string{"churn": value}}, "labels.churn")
			return err
		})
	}
	run("relabel", func(ctx context.Context, ms storage.MetaStore, i int) error {
		name := "P"
		if i%2 == 1 {
			name = parents.pickLayer()
		}
		return relabel(ctx, ms, name, strconv.Itoa(i))
	})
	run("siblings", func(ctx context.Context, ms storage.MetaStore, i int) error {
		active, committed := fmt.Sprintf("sib-%d", i), fmt.Sprintf("sibc-%d", i)
		for _, op := range []func(ctx context.Context) error{
			func(ctx context.Context) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, active, "P")
				return err
			},
			func(ctx context.Context) error {
				_, err := storage.CommitActive(ctx, active, committed, snapshots.Usage{})
				return err
			},
			func(ctx context.Context) error { _, _, err := storage.Remove(ctx, committed); return err },
		} {
			if err := ms.WithTransaction(ctx, true, op); err != nil {
				return err
			}
		}
		return nil
	})
	run("stat, usage, walk", func(ctx context.Context, ms storage.MetaStore, i int) error {
		// Picked before the transaction reads: a name added later may be
		// newer than its revision.
		names := []string{parents.pick()}
		if c := children(); len(c) > 0 {
			names = append(names, c[rand.IntN(len(c))])
		}
		return ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			for _, name := range names {
				if _, _, _, err := storage.GetInfo(ctx, name); err != nil {
					return err
				}
			}
			if i%10 != 0 {
				return nil
			}
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
		})
	})
	beat = func() {
		for _, b := range beats {
			select {
			case b <- struct{}{}:
			default:
			}
		}
	}
	return beat, func() { cancel(); wg.Wait() }
}

// runDriver makes a parent P through the driver, then, under churn,
// childPrepares children of P and a chain of chainLength layers on P, and
// counts.
func runDriver(t *testing.T, c *etcdtest.Cluster, open func(root string, ms storage.MetaStore) (driver, error)) counts {
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	cfg := c.ClientConfig()
	prefix := "drivers/" + t.Name()
	root := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(root, "snapshots"), 0o700))

	var lost atomic.Int64
	ms, err := storage.NewEtcdStore(prefix, &cfg, storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV { return lostKV{kv, &lost} }))
	require.NoError(t, err)
	d, err := open(root, ms)
	if err != nil {
		_ = ms.Close()
	}
	require.NoError(t, err)
	defer func() { assert.NoError(t, d.close()) }()

	var (
		mu       sync.Mutex
		returned = map[string]string{} // key -> ID, of every successful Prepare
		children []string
	)
	var n counts
	beat := func() {} // no churn yet
	prepare := func(key, parent string) bool {
		beat()
		id, err := d.prepare(ctx, key, parent)
		if err != nil {
			n.failed++
			t.Logf("Prepare(%s, %s): %v", key, parent, err)
			return false
		}
		n.prepares++
		mu.Lock()
		defer mu.Unlock()
		returned[key] = id
		return true
	}
	// Pin the ID block before churn, like any driver after its first
	// Prepare.
	require.True(t, prepare("P-active", ""))
	require.NoError(t, d.commit(ctx, "P", "P-active"))
	parents := &parentSet{names: []string{"P"}}

	var stop func()
	beat, stop = churn(ctx, t, cfg, prefix, parents, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(children)
	})
	top := "P"
	for i := range childPrepares {
		if key := fmt.Sprintf("child-%d", i); prepare(key, "P") {
			mu.Lock()
			children = append(children, key) // for the Stat and Usage churn
			mu.Unlock()
		}
		if i%(childPrepares/chainLength) == 0 {
			key, name := fmt.Sprintf("chain-%d-active", i), fmt.Sprintf("chain-%d", i)
			if !prepare(key, top) {
				continue
			}
			if err := d.commit(ctx, name, key); err != nil {
				t.Errorf("Commit(%s, %s): %v", name, key, err)
				continue
			}
			top = name
			parents.add(name)
		}
	}
	stop()
	require.NoError(t, ctx.Err(), "the run must end within its time")

	// What is on disk against what the store holds.
	var ids map[string]string
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) (err error) {
		ids, err = storage.IDMap(ctx)
		return err
	}))
	for key, id := range returned {
		if _, err := os.Stat(filepath.Join(root, "snapshots", id)); err != nil {
			n.missing++
			t.Logf("missing: Prepare(%s) returned ID %s: %v", key, id, err)
		}
	}
	entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
	require.NoError(t, err)
	left := d.leftovers()
	for _, e := range entries {
		if _, ok := ids[e.Name()]; ok {
			continue
		}
		n.orphaned++
		if !left[e.Name()] {
			n.unexplained++
			t.Logf("orphan not left by a lost attempt: %s", e.Name())
		}
	}
	n.lost = lost.Load()
	if fd, ok := d.(interface{ counters() (int64, int64) }); ok {
		n.retries, n.commitRuns = fd.counters()
	} else {
		// nativesnap's callbacks are its own: every lost commit is a
		// callback run again (of a Prepare, or of a Commit).
		n.retries = n.lost
	}
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	assert.Empty(t, problems)
	return n
}

func TestDriverPatternsUnderChurn(t *testing.T) {
	c := etcdtest.Start(t)
	for _, tc := range []struct {
		name string
		open func(root string, ms storage.MetaStore) (driver, error)
		// genuine: the shape reads the parents' labels, so a relabel
		// churn conflicts with it for real and it may run again.
		genuine bool
	}{
		{"native-like", func(root string, ms storage.MetaStore) (driver, error) {
			return &nativeLike{fsDriver{root: root, ms: ms}}, nil
		}, false},
		{"erofs-like", func(root string, ms storage.MetaStore) (driver, error) {
			return &erofsLike{fsDriver{root: root, ms: ms}}, nil
		}, true},
		{"overlay-like", func(root string, ms storage.MetaStore) (driver, error) {
			return &overlayLike{fsDriver{root: root, ms: ms}}, nil
		}, false},
		{"examples/nativesnap", func(root string, ms storage.MetaStore) (driver, error) {
			sn, err := nativesnap.New(root, ms)
			return nativesnapDriver{sn}, err
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each in its own root and data directory
			start := time.Now()
			n := runDriver(t, c, tc.open)
			t.Logf("%s: %d prepares (%d failed), %d prepare retries, %d commit retries, %d lost etcd commits, %d missing, %d orphaned (%d unexplained), in %v",
				tc.name, n.prepares, n.failed, n.retries, n.commitRuns, n.lost, n.missing, n.orphaned, n.unexplained, time.Since(start).Round(time.Millisecond))
			assert.Zero(t, n.failed, "failed Prepares")
			assert.Zero(t, n.missing, "Prepares whose directory is missing")
			// The churn never touches the driver's actives.
			assert.Zero(t, n.commitRuns, "Commit callbacks run again")
			if tc.genuine {
				assert.Zero(t, n.unexplained, "orphans no lost attempt explains")
				assert.LessOrEqual(t, int64(n.orphaned), n.retries, "every orphan comes from a retry")
				return
			}
			assert.Zero(t, n.retries, "Prepare callbacks run again: nothing the churn commits changes what a Prepare reads or writes")
			assert.Zero(t, n.orphaned, "orphaned directories")
		})
	}
}
