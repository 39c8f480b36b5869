package storage_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/snapmeta/storage/testsuite"
)

// sharedEtcd is one embedded server for the etcd tests of this package; each
// test uses its own root, so they do not see each other.
var (
	sharedEtcdOnce sync.Once
	sharedEtcd     *etcdtest.Cluster
	sharedEtcdErr  error
)

func etcdServer(t testing.TB) *etcdtest.Cluster {
	t.Helper()
	sharedEtcdOnce.Do(func() { sharedEtcd, sharedEtcdErr = etcdtest.New() })
	require.NoError(t, sharedEtcdErr)
	return sharedEtcd
}

var rootSeq atomic.Int64

// uniqueRoot returns a root no other test uses.
func uniqueRoot(t testing.TB) string {
	return fmt.Sprintf("test/%s/%d", t.Name(), rootSeq.Add(1))
}

func openEtcd(t testing.TB, root string, opts ...storage.EtcdOpt) storage.MetaStore {
	t.Helper()
	cfg := etcdServer(t).ClientConfig()
	ms, err := storage.NewEtcdStore(root, &cfg, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ms.Close() })
	return ms
}

func TestEtcdConformance(t *testing.T) {
	testsuite.MetaStoreSuite(t, "etcd", func(t testing.TB, root string) (storage.MetaStore, error) {
		cfg := etcdServer(t).ClientConfig()
		return storage.NewEtcdStore(root, &cfg)
	})
}

func TestEtcdConformanceWithSmallPagesAndBlocks(t *testing.T) {
	testsuite.MetaStoreSuite(t, "etcd-small", func(t testing.TB, root string) (storage.MetaStore, error) {
		cfg := etcdServer(t).ClientConfig()
		return storage.NewEtcdStore(root, &cfg, storage.WithPageSize(2))
	})
}

// TestEtcdConformanceWithOneKeyPages runs the suite with a page boundary
// between every two snapshots, where a walk's merge of stored pages with the
// transaction's writes (written by its own callback, say) is most exposed.
func TestEtcdConformanceWithOneKeyPages(t *testing.T) {
	testsuite.MetaStoreSuite(t, "etcd-page1", func(t testing.TB, root string) (storage.MetaStore, error) {
		cfg := etcdServer(t).ClientConfig()
		return storage.NewEtcdStore(root, &cfg, storage.WithPageSize(1))
	})
}

// warmUp runs the first transaction of an etcd store without host scopes,
// which reads the root's mode once, so that the requests counted next are
// those of the operation alone.
func warmUp(t testing.TB, ms storage.MetaStore) {
	t.Helper()
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(context.Context) error { return nil }))
}

// update runs fn in a writable transaction and commits it, without retry.
func update(t testing.TB, ms storage.MetaStore, fn func(ctx context.Context) error) {
	t.Helper()
	require.NoError(t, ms.WithTransaction(context.Background(), true, fn))
}

func commitLayer(ctx context.Context, key, parent string) error {
	if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key+"-active", parent); err != nil {
		return err
	}
	_, err := storage.CommitActive(ctx, key+"-active", key, snapshots.Usage{})
	return err
}

func TestEtcdConstructorsRefuseBadArguments(t *testing.T) {
	cfg := etcdServer(t).ClientConfig()
	for _, tc := range []struct {
		name string
		open func() (storage.MetaStore, error)
	}{
		{"empty root", func() (storage.MetaStore, error) { return storage.NewEtcdStore("", &cfg) }},
		{"root with layout element", func() (storage.MetaStore, error) { return storage.NewEtcdStore("a/storage.v1/b", &cfg) }},
		{"nil config", func() (storage.MetaStore, error) { return storage.NewEtcdStore("a", nil) }},
		{"nil client", func() (storage.MetaStore, error) { return storage.NewEtcdStoreFromClient(nil, "a") }},
		{"empty root on client", func() (storage.MetaStore, error) {
			return storage.NewEtcdStoreFromClient(etcdServer(t).Client(t), "")
		}},
		{"zero page size", func() (storage.MetaStore, error) { return storage.NewEtcdStore("a", &cfg, storage.WithPageSize(0)) }},
		{"zero max txn ops", func() (storage.MetaStore, error) { return storage.NewEtcdStore("a", &cfg, storage.WithMaxTxnOps(0)) }},
		{"negative request timeout", func() (storage.MetaStore, error) {
			return storage.NewEtcdStore("a", &cfg, storage.WithRequestTimeout(-time.Second))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms, err := tc.open()
			assert.Nil(t, ms)
			assert.True(t, errdefs.IsInvalidArgument(err), "got %v", err)
		})
	}
}

func TestEtcdStoreFromClientLeavesTheClientOpen(t *testing.T) {
	cli := etcdServer(t).Client(t)
	ms, err := storage.NewEtcdStoreFromClient(cli, uniqueRoot(t))
	require.NoError(t, err)
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	require.NoError(t, ms.Close())
	require.NoError(t, ms.Close(), "closing twice is safe")
	_, err = cli.Get(context.Background(), "anything")
	assert.NoError(t, err, "the caller's client still works")
}

func TestEtcdRootsAreIsolated(t *testing.T) {
	base := uniqueRoot(t)
	roots := []string{base + "/a", base + "/a/b", base + "/ab"}
	for i, root := range roots {
		ms := openEtcd(t, root)
		update(t, ms, func(ctx context.Context) error {
			if err := commitLayer(ctx, "shared", ""); err != nil {
				return err
			}
			return commitLayer(ctx, "only-"+strconv.Itoa(i), "shared")
		})
	}
	for i, root := range roots {
		ms := openEtcd(t, root)
		var names []string
		require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
				names = append(names, info.Name)
				return nil
			})
		}))
		assert.Equal(t, []string{"only-" + strconv.Itoa(i), "shared"}, names, "root %q", root)
	}
}

func TestEtcdNamesShapedLikeTheLayoutStayInTheirPlace(t *testing.T) {
	ms := openEtcd(t, uniqueRoot(t))
	parents := []string{"a", "a/b", "a%2Fb", "../x", "a/storage.v1/snapshots/b", "trailing/", "/"}
	update(t, ms, func(ctx context.Context) error {
		for _, p := range parents {
			if err := commitLayer(ctx, p, ""); err != nil {
				return err
			}
		}
		// Only "a/b" gets a child.
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "child", "a/b")
		return err
	})
	ctx := context.Background()
	for _, p := range parents {
		err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, p)
			return err
		})
		if p == "a/b" {
			assert.True(t, errdefs.IsFailedPrecondition(err), "%q has a child: %v", p, err)
		} else {
			assert.NoError(t, err, "%q has no child", p)
		}
	}
	require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		assert.Len(t, ids, 2)
		return err
	}))
}

// race runs a and b on two hosts, each in its own transaction, so that both
// have read before either commits, and returns their commit errors.
func race(t *testing.T, hostA, hostB storage.MetaStore, a, b func(ctx context.Context) error) (error, error) {
	t.Helper()
	var ready, done sync.WaitGroup
	ready.Add(2)
	done.Add(2)
	errs := make([]error, 2)
	run := func(i int, ms storage.MetaStore, fn func(ctx context.Context) error) {
		defer done.Done()
		ctx, tx, err := ms.TransactionContext(context.Background(), true)
		if err != nil {
			errs[i] = err
			ready.Done()
			return
		}
		err = fn(ctx)
		ready.Done()
		ready.Wait()
		if err != nil {
			_ = tx.Rollback()
			errs[i] = err
			return
		}
		errs[i] = tx.Commit()
	}
	go run(0, hostA, a)
	go run(1, hostB, b)
	done.Wait()
	return errs[0], errs[1]
}

const raceRounds = 100

func TestEtcdRaceRemoveParentAgainstPrepareChild(t *testing.T) {
	root := uniqueRoot(t)
	hostA, hostB := openEtcd(t, root), openEtcd(t, root)
	wins := map[string]int{}
	for i := range raceRounds {
		parent, child := fmt.Sprintf("p%d", i), fmt.Sprintf("c%d", i)
		update(t, hostA, func(ctx context.Context) error { return commitLayer(ctx, parent, "") })
		errRemove, errPrepare := race(t, hostA, hostB,
			func(ctx context.Context) error { _, _, err := storage.Remove(ctx, parent); return err },
			func(ctx context.Context) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, child, parent)
				return err
			})
		require.True(t, (errRemove == nil) != (errPrepare == nil), "exactly one commits: remove=%v prepare=%v", errRemove, errPrepare)
		lost := errRemove
		if errRemove == nil {
			lost = errPrepare
			wins["remove"]++
		} else {
			wins["prepare"]++
		}
		require.True(t, errdefs.IsConflict(lost), "the loser conflicts: %v", lost)

		require.NoError(t, hostB.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			_, _, _, errP := storage.GetInfo(ctx, parent)
			_, _, _, errC := storage.GetInfo(ctx, child)
			if errC == nil {
				assert.NoError(t, errP, "a child never outlives its parent")
			}
			return nil
		}))
	}
	t.Logf("wins over %d rounds: %v", raceRounds, wins)
}

func TestEtcdRaceCommitTwoActivesToOneName(t *testing.T) {
	root := uniqueRoot(t)
	hostA, hostB := openEtcd(t, root), openEtcd(t, root)
	for i := range raceRounds {
		name := fmt.Sprintf("layer%d", i)
		a, b := name+"-a", name+"-b"
		update(t, hostA, func(ctx context.Context) error {
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, a, ""); err != nil {
				return err
			}
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, b, "")
			return err
		})
		commitAs := func(key string) func(ctx context.Context) error {
			return func(ctx context.Context) error {
				_, err := storage.CommitActive(ctx, key, name, snapshots.Usage{})
				return err
			}
		}
		errA, errB := race(t, hostA, hostB, commitAs(a), commitAs(b))
		require.True(t, (errA == nil) != (errB == nil), "exactly one commits: a=%v b=%v", errA, errB)
		lost := errA
		if errA == nil {
			lost = errB
		}
		assert.True(t, errdefs.IsConflict(lost) || errdefs.IsAlreadyExists(lost), "the loser conflicts: %v", lost)
	}
}

func TestEtcdRaceCreateOneKeyTwice(t *testing.T) {
	root := uniqueRoot(t)
	hostA, hostB := openEtcd(t, root), openEtcd(t, root)
	for i := range raceRounds {
		key := fmt.Sprintf("k%d", i)
		create := func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, "")
			return err
		}
		errA, errB := race(t, hostA, hostB, create, create)
		require.True(t, (errA == nil) != (errB == nil), "exactly one commits: a=%v b=%v", errA, errB)
		lost := errA
		if errA == nil {
			lost = errB
		}
		assert.True(t, errdefs.IsConflict(lost) || errdefs.IsAlreadyExists(lost), "the loser conflicts: %v", lost)
	}
}

func TestEtcdWithTransactionRetriesAConflict(t *testing.T) {
	root := uniqueRoot(t)
	hostA, hostB := openEtcd(t, root), openEtcd(t, root)
	update(t, hostA, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	attempts := 0
	err := hostA.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		attempts++
		if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"by": "a"}}); err != nil {
			return err
		}
		if attempts == 1 {
			// Another host changes what this transaction read.
			update(t, hostB, func(ctx context.Context) error {
				_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"by": "b"}})
				return err
			})
		}
		return nil
	})
	require.NoError(t, err)
	assert.Equal(t, 2, attempts)
	require.NoError(t, hostB.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, "base")
		assert.Equal(t, "a", info.Labels["by"])
		return err
	}))
}

func TestEtcdWithTransactionReturnsTheLastConflictWhenTheContextEnds(t *testing.T) {
	root := uniqueRoot(t)
	hostA, hostB := openEtcd(t, root), openEtcd(t, root)
	update(t, hostA, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	n := 0
	err := hostA.WithTransaction(ctx, true, func(ctx context.Context) error {
		n++
		if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base"}); err != nil {
			return err
		}
		update(t, hostB, func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"n": strconv.Itoa(n)}})
			return err
		})
		return nil
	})
	assert.True(t, errdefs.IsConflict(err), "got %v", err)
	assert.Greater(t, n, 1, "conflicts were retried")
}

func TestEtcdReadsSeeOneRevisionAcrossPages(t *testing.T) {
	root := uniqueRoot(t)
	reader, writer := openEtcd(t, root, storage.WithPageSize(2)), openEtcd(t, root)
	update(t, writer, func(ctx context.Context) error {
		for i := range 5 {
			if err := commitLayer(ctx, fmt.Sprintf("l%d", i), ""); err != nil {
				return err
			}
		}
		return nil
	})
	var seen []string
	require.NoError(t, reader.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			if len(seen) == 0 {
				update(t, writer, func(ctx context.Context) error {
					if _, _, err := storage.Remove(ctx, "l4"); err != nil {
						return err
					}
					return commitLayer(ctx, "l9", "")
				})
			}
			seen = append(seen, info.Name)
			return nil
		})
	}))
	assert.Equal(t, []string{"l0", "l1", "l2", "l3", "l4"}, seen)
}

func TestEtcdCompactedReadRevisionIsAConflict(t *testing.T) {
	root := uniqueRoot(t)
	// A watch cache's copy does not depend on etcd's history: only a store
	// reading etcd itself reads at a compacted revision.
	ms := openEtcd(t, root, storage.WithoutWatchCache())
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	ctx, tx, err := ms.TransactionContext(context.Background(), false)
	require.NoError(t, err)
	defer tx.Rollback()
	_, _, _, err = storage.GetInfo(ctx, "base")
	require.NoError(t, err)

	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "other", "") })
	cli := etcdServer(t).Client(t)
	resp, err := cli.Get(context.Background(), "compact-probe")
	require.NoError(t, err)
	_, err = cli.Compact(context.Background(), resp.Header.Revision)
	require.NoError(t, err)

	_, _, _, err = storage.GetInfo(ctx, "other")
	assert.True(t, errdefs.IsConflict(err), "got %v", err)
}

func TestEtcdCorruptRecordIsDataLoss(t *testing.T) {
	root := uniqueRoot(t)
	ms := openEtcd(t, root)
	cli := etcdServer(t).Client(t)
	for name, value := range map[string]string{
		"garbage":         "\x01\xff\xff",
		"unknown-version": "\x07rest",
		"empty":           "",
	} {
		_, err := cli.Put(context.Background(), root+"/storage.v1/snapshots/"+name, value)
		require.NoError(t, err)
		require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, name)
			assert.True(t, errdefs.IsDataLoss(err), "%s: got %v", name, err)
			return nil
		}))
	}
}

func TestEtcdIDsAreUniqueAcrossClientsAndRestarts(t *testing.T) {
	root := uniqueRoot(t)
	const hosts, perHost = 4, 150
	var mu sync.Mutex
	seen := map[string]string{}
	record := func(id, name string) {
		mu.Lock()
		defer mu.Unlock()
		prev, dup := seen[id]
		assert.False(t, dup, "ID %s given to %s and %s", id, prev, name)
		seen[id] = name
	}
	createAll := func(round int) {
		var wg sync.WaitGroup
		for h := range hosts {
			ms := openEtcd(t, root)
			wg.Go(func() {
				defer ms.Close()
				for i := range perHost {
					name := fmt.Sprintf("r%d-h%d-%d", round, h, i)
					require.NoError(t, ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
						s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "")
						if err == nil {
							record(s.ID, name)
						}
						return err
					}))
					if i%2 == 0 {
						update(t, ms, func(ctx context.Context) error { _, _, err := storage.Remove(ctx, name); return err })
					}
				}
			})
		}
		wg.Wait()
	}
	createAll(0)
	createAll(1) // new stores: a restart of every host
	assert.Len(t, seen, 2*hosts*perHost)
}

func TestEtcdTransactionTooLargeFailsAtCommitAndAppliesNothing(t *testing.T) {
	root := uniqueRoot(t)
	ms := openEtcd(t, root)
	ctx, tx, err := ms.TransactionContext(context.Background(), true)
	require.NoError(t, err)
	for i := range storage.DefaultEtcdMaxTxnOps + 1 {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("s%d", i), "")
		require.NoError(t, err)
	}
	err = tx.Commit()
	assert.ErrorIs(t, err, storage.ErrTooLarge)
	assert.True(t, errdefs.IsResourceExhausted(err))

	// Each label within containerd's 4 KiB bound, together over etcd's
	// 1.5 MiB request limit.
	big := map[string]string{}
	for i := range 500 {
		big[fmt.Sprintf("label-%03d", i)] = strings.Repeat("x", 4000)
	}
	err = ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "huge", "", snapshots.WithLabels(big))
		return err
	})
	assert.True(t, errdefs.IsResourceExhausted(err), "got %v", err)

	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		assert.Empty(t, ids)
		return err
	}))
}

func TestEtcdCanceledContextEndsTheCall(t *testing.T) {
	ms := openEtcd(t, uniqueRoot(t))
	ctx, cancel := context.WithCancel(context.Background())
	tctx, tx, err := ms.TransactionContext(ctx, false)
	require.NoError(t, err)
	defer tx.Rollback()
	cancel()
	_, _, _, err = storage.GetInfo(tctx, "x")
	assert.ErrorIs(t, err, context.Canceled)
	assert.True(t, errdefs.IsCanceled(err))
}

func TestEtcdUnreachableClusterIsUnavailableWithinTheTimeout(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())

	cfg := clientv3.Config{Endpoints: []string{addr}, DialTimeout: time.Second, Logger: zap.NewNop()}
	ms, err := storage.NewEtcdStore("root", &cfg, storage.WithRequestTimeout(time.Second))
	require.NoError(t, err)
	defer ms.Close()
	start := time.Now()
	err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, "x")
		return err
	})
	assert.True(t, errdefs.IsUnavailable(err), "got %v", err)
	assert.Less(t, time.Since(start), 10*time.Second)
}

// countingKV counts the requests, each one round trip to etcd.
type countingKV struct {
	clientv3.KV
	n *atomic.Int64
}

func (c countingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.n.Add(1)
	return c.KV.Get(ctx, key, opts...)
}

func (c countingKV) Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	c.n.Add(1)
	return c.KV.Put(ctx, key, val, opts...)
}

func (c countingKV) Delete(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.DeleteResponse, error) {
	c.n.Add(1)
	return c.KV.Delete(ctx, key, opts...)
}

func (c countingKV) Do(ctx context.Context, op clientv3.Op) (clientv3.OpResponse, error) {
	c.n.Add(1)
	return c.KV.Do(ctx, op)
}

func (c countingKV) Txn(ctx context.Context) clientv3.Txn {
	return hookedTxn{Txn: c.KV.Txn(ctx), beforeCommit: func() error { c.n.Add(1); return nil }}
}

// hookedTxn runs beforeCommit before each Commit, which fails with its
// error without a request.
type hookedTxn struct {
	clientv3.Txn
	beforeCommit func() error
}

func (h hookedTxn) If(cs ...clientv3.Cmp) clientv3.Txn {
	return hookedTxn{Txn: h.Txn.If(cs...), beforeCommit: h.beforeCommit}
}

func (h hookedTxn) Then(ops ...clientv3.Op) clientv3.Txn {
	return hookedTxn{Txn: h.Txn.Then(ops...), beforeCommit: h.beforeCommit}
}

func (h hookedTxn) Else(ops ...clientv3.Op) clientv3.Txn {
	return hookedTxn{Txn: h.Txn.Else(ops...), beforeCommit: h.beforeCommit}
}

func (h hookedTxn) Commit() (*clientv3.TxnResponse, error) {
	if err := h.beforeCommit(); err != nil {
		return nil, err
	}
	return h.Txn.Commit()
}

// TestEtcdRoundTripsPerOperation counts the requests of each operation,
// reading etcd and reading the watch cache's copy: with the copy, a
// writable transaction sends its commit alone (a refusal, the Txn that
// confirms it) and a read-only one the request for the revision alone.
func TestEtcdRoundTripsPerOperation(t *testing.T) {
	for _, mode := range []struct {
		name   string
		opt    storage.EtcdOpt
		cached bool
	}{
		{"reading etcd", storage.WithoutWatchCache(), false},
		{"reading the watch cache", storage.WithWatchCache(), true},
	} {
		t.Run(mode.name, func(t *testing.T) { etcdRoundTrips(t, mode.opt, mode.cached) })
	}
}

func etcdRoundTrips(t *testing.T, opt storage.EtcdOpt, cached bool) {
	var n atomic.Int64
	ms := openEtcd(t, uniqueRoot(t), opt, storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV { return countingKV{KV: kv, n: &n} }))
	// Build a chain of 64 committed layers; this also reserves the first
	// block of IDs, which is amortised over the block.
	parent := ""
	for i := range 64 {
		name := fmt.Sprintf("layer%02d", i)
		update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, name, parent) })
		parent = name
	}
	update(t, ms, func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "shallow", "layer00")
		if err != nil {
			return err
		}
		_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "deep", "layer63")
		return err
	})
	trips := func(writable bool, fn func(ctx context.Context) error) int64 {
		t.Helper()
		if cached {
			require.NoError(t, storage.WaitWatchCacheCurrent(context.Background(), ms))
		}
		n.Store(0)
		require.NoError(t, ms.WithTransaction(context.Background(), writable, fn))
		return n.Load()
	}
	for _, tc := range []struct {
		name             string
		writable         bool
		direct, fromCopy int64 // the most requests reading etcd, the copy
		fn               func(ctx context.Context) error
	}{
		{"read-only GetSnapshot", false, 1, 1, func(ctx context.Context) error { _, err := storage.GetSnapshot(ctx, "deep"); return err }},
		{"read-only GetSnapshot depth 1", false, 1, 1, func(ctx context.Context) error { _, err := storage.GetSnapshot(ctx, "shallow"); return err }},
		{"read-only GetInfo", false, 1, 1, func(ctx context.Context) error { _, _, _, err := storage.GetInfo(ctx, "layer10"); return err }},
		{"CreateSnapshot with parent + Commit", true, 2, 1, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "new", "layer63")
			return err
		}},
		{"CommitActive + Commit", true, 2, 1, func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "new", "layer64", snapshots.Usage{Size: 1})
			return err
		}},
		{"Remove + Commit", true, 2, 1, func(ctx context.Context) error { _, _, err := storage.Remove(ctx, "layer64"); return err }},
		{"Remove refused for children", true, 1, 1, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, "layer63")
			if errdefs.IsFailedPrecondition(err) {
				return nil
			}
			return fmt.Errorf("expected a refusal, got %v", err)
		}},
	} {
		want := tc.direct
		if cached {
			want = tc.fromCopy
		}
		got := trips(tc.writable, tc.fn)
		assert.LessOrEqual(t, got, want, tc.name)
		assert.Positive(t, got, tc.name)
		t.Logf("%s: %d round trips", tc.name, got)
	}

	// A walk reads in pages at one revision: 66 snapshots at the default
	// page size is one request (with the copy: the revision).
	got := trips(false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
	})
	assert.Equal(t, int64(1), got, "walk")
}

func TestEtcdCloseLeavesNoTransactionUsable(t *testing.T) {
	ms := openEtcd(t, uniqueRoot(t))
	require.NoError(t, ms.Close())
	require.NoError(t, ms.Close())
	_, _, err := ms.TransactionContext(context.Background(), false)
	assert.True(t, errors.Is(err, storage.ErrClosed))
}

// slowKV makes every transaction wait for its context to end, like a
// server that does not answer.
type slowKV struct{ clientv3.KV }

func (s slowKV) Txn(ctx context.Context) clientv3.Txn { return slowTxn{ctx: ctx, Txn: s.KV.Txn(ctx)} }

func (s slowKV) Do(ctx context.Context, _ clientv3.Op) (clientv3.OpResponse, error) {
	<-ctx.Done()
	return clientv3.OpResponse{}, ctx.Err()
}

type slowTxn struct {
	clientv3.Txn
	ctx context.Context
}

func (s slowTxn) If(cs ...clientv3.Cmp) clientv3.Txn   { return slowTxn{s.Txn.If(cs...), s.ctx} }
func (s slowTxn) Then(ops ...clientv3.Op) clientv3.Txn { return slowTxn{s.Txn.Then(ops...), s.ctx} }
func (s slowTxn) Commit() (*clientv3.TxnResponse, error) {
	<-s.ctx.Done()
	return nil, s.ctx.Err()
}

func TestEtcdDeadlinesAreToldApart(t *testing.T) {
	slow := storage.WithKVWrapper(func(kv clientv3.KV) clientv3.KV { return slowKV{kv} })
	t.Run("the caller's deadline is the caller's", func(t *testing.T) {
		ms := openEtcd(t, uniqueRoot(t), storage.WithoutWatchCache(), slow, storage.WithRequestTimeout(time.Minute))
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		err := ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			_, err := storage.GetSnapshot(ctx, "x")
			return err
		})
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.False(t, errdefs.IsUnavailable(err), "got %v", err)
	})
	t.Run("the request timeout is Unavailable", func(t *testing.T) {
		ms := openEtcd(t, uniqueRoot(t), storage.WithoutWatchCache(), slow, storage.WithRequestTimeout(100*time.Millisecond))
		err := ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			_, err := storage.GetSnapshot(ctx, "x")
			return err
		})
		assert.True(t, errdefs.IsUnavailable(err), "got %v", err)
	})
}
