package storage_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/snapmeta/storage/testsuite"
)

func TestEtcdWatchCacheConformance(t *testing.T) {
	testsuite.MetaStoreSuite(t, "etcd-watch-cache", func(t testing.TB, root string) (storage.MetaStore, error) {
		cfg := etcdServer(t).ClientConfig()
		return storage.NewEtcdStore(root, &cfg, storage.WithWatchCache())
	})
}

// cacheStale opens, on one root, a writer reading etcd and a store with a
// watch cache whose copy is held back from then on (released at the end of
// the test); the writer then commits the layer "P" and relabels "S",
// which exist in the copy with their old labels. The control: a second
// cached store, not held, comes to hold P while the held copy does not.
func cacheStale(t *testing.T) (writer, cached storage.MetaStore) {
	root := uniqueRoot(t)
	writer = openEtcd(t, root, storage.WithoutWatchCache())
	cached = openEtcd(t, root, storage.WithWatchCache())
	witness := openEtcd(t, root, storage.WithWatchCache())
	update(t, writer, func(ctx context.Context) error { return commitLayer(ctx, "S", "") })
	require.Eventually(t, func() bool { return storage.CopyHolds(cached, "S") }, 10*time.Second, time.Millisecond)
	release := storage.HoldWatchCache(cached)
	t.Cleanup(release)
	update(t, writer, func(ctx context.Context) error {
		if err := commitLayer(ctx, "P", ""); err != nil {
			return err
		}
		_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "S", Labels: map[string]string{"by": "writer"}})
		return err
	})
	require.Eventually(t, func() bool { return storage.CopyHolds(witness, "P") }, 10*time.Second, time.Millisecond, "control: the watch delivers P")
	require.False(t, storage.CopyHolds(cached, "P"), "control: the held copy is behind etcd")
	return writer, cached
}

func TestEtcdWatchCacheRefusalsFromAStaleCopyAreCheckedAgainstEtcd(t *testing.T) {
	t.Run("a transaction's first operation runs again on what etcd holds", func(t *testing.T) {
		_, cached := cacheStale(t)
		ctx, tx, err := cached.TransactionContext(context.Background(), true)
		require.NoError(t, err)
		defer tx.Rollback()
		// The copy has no P: without the check this is NotFound.
		_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "child", "P")
		require.NoError(t, err)
		require.NoError(t, tx.Commit())
	})
	t.Run("a later operation's refusal becomes a conflict", func(t *testing.T) {
		_, cached := cacheStale(t)
		ctx, tx, err := cached.TransactionContext(context.Background(), true)
		require.NoError(t, err)
		defer tx.Rollback()
		_, _, _, err = storage.GetInfo(ctx, "S")
		require.NoError(t, err)
		_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "child", "P")
		assert.True(t, errdefs.IsConflict(err), "got %v", err)
	})
	t.Run("WithTransaction runs the callback again and succeeds", func(t *testing.T) {
		_, cached := cacheStale(t)
		var runs atomic.Int32
		update(t, cached, func(ctx context.Context) error {
			runs.Add(1)
			if _, _, _, err := storage.GetInfo(ctx, "S"); err != nil {
				return err
			}
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "child", "P")
			return err
		})
		assert.Equal(t, int32(2), runs.Load(), "the first run met the stale copy")
	})
	t.Run("a refusal that holds in etcd is returned", func(t *testing.T) {
		_, cached := cacheStale(t)
		err := cached.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "child", "absent")
			return err
		})
		assert.True(t, errdefs.IsNotFound(err), "got %v", err)
	})
}

func TestEtcdWatchCacheStaleCopyCostsAConflictNotALostUpdate(t *testing.T) {
	_, cached := cacheStale(t)
	var runs atomic.Int32
	update(t, cached, func(ctx context.Context) error {
		runs.Add(1)
		_, info, _, err := storage.GetInfo(ctx, "S")
		if err != nil {
			return err
		}
		labels := map[string]string{"also": "cached"}
		for k, v := range info.Labels {
			labels[k] = v
		}
		_, err = storage.UpdateInfo(ctx, snapshots.Info{Name: "S", Labels: labels})
		return err
	})
	assert.Equal(t, int32(2), runs.Load(), "the first run read the stale copy and lost its commit")
	require.NoError(t, cached.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, "S")
		assert.Equal(t, map[string]string{"by": "writer", "also": "cached"}, info.Labels)
		return err
	}))
}

func TestEtcdWatchCacheReadOnlyTransactionsSeeEveryCommitBeforeThem(t *testing.T) {
	_, cached := cacheStale(t)
	// The copy cannot reach etcd's revision while held: the read waits for
	// it a while, then reads etcd at that revision.
	start := time.Now()
	require.NoError(t, cached.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, "P")
		return err
	}))
	t.Logf("read with the copy held back: %v", time.Since(start))
}

// TestEtcdWatchCacheFollowsARestartedServer restarts the only member: the
// watch breaks, the store reads etcd meanwhile, lists again and follows.
func TestEtcdWatchCacheFollowsARestartedServer(t *testing.T) {
	c := etcdtest.Start(t)
	cfg := c.ClientConfig()
	cached, err := storage.NewEtcdStore("restart", &cfg, storage.WithWatchCache(), storage.WithRequestTimeout(5*time.Second))
	require.NoError(t, err)
	defer cached.Close()
	writer, err := storage.NewEtcdStore("restart", &cfg, storage.WithoutWatchCache(), storage.WithRequestTimeout(5*time.Second))
	require.NoError(t, err)
	defer writer.Close()

	update(t, writer, func(ctx context.Context) error { return commitLayer(ctx, "before", "") })
	require.Eventually(t, func() bool { return storage.CopyHolds(cached, "before") }, 10*time.Second, time.Millisecond)
	c.Stop(0)
	require.NoError(t, c.Restart(0))
	update(t, writer, func(ctx context.Context) error { return commitLayer(ctx, "after", "before") })
	require.NoError(t, cached.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, "after")
		return err
	}))
	assert.Eventually(t, func() bool { return storage.CopyHolds(cached, "after") }, 10*time.Second, time.Millisecond,
		"the copy follows the restarted server")
	update(t, cached, func(ctx context.Context) error { return commitLayer(ctx, "mine", "after") })
	problems, err := storage.Check(context.Background(), writer)
	require.NoError(t, err)
	assert.Empty(t, problems)
}

// TestEtcdWatchCacheCopyIsEtcdAtItsRevision runs a workload of commits by
// the cached store itself (whose writes it applies at once when it can)
// and by another client (which come by the watch), many keys per commit,
// and compares the copy with etcd at the copy's revision, key by key.
func TestEtcdWatchCacheCopyIsEtcdAtItsRevision(t *testing.T) {
	root := uniqueRoot(t)
	cached := openEtcd(t, root, storage.WithWatchCache())
	other := openEtcd(t, root, storage.WithoutWatchCache())
	ctx := context.Background()
	for round := range 20 {
		for j, ms := range []storage.MetaStore{cached, other, cached} {
			update(t, ms, func(ctx context.Context) error {
				for i := range 4 {
					name := fmt.Sprintf("r%d-%d-%d", round, j, i)
					if err := commitLayer(ctx, name, ""); err != nil {
						return err
					}
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name+"-a", name); err != nil {
						return err
					}
				}
				return nil
			})
		}
		update(t, other, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, fmt.Sprintf("r%d-0-0-a", round))
			return err
		})
		// Keys that exist already, rewritten by the cached store itself
		// (their create revision and version kept) and by the other.
		for j, ms := range []storage.MetaStore{cached, other} {
			update(t, ms, func(ctx context.Context) error {
				_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: fmt.Sprintf("r%d-1-%d", round, j),
					Labels: map[string]string{"round": fmt.Sprint(round)}}, "labels.round")
				return err
			})
		}
	}
	require.NoError(t, storage.WaitWatchCacheCurrent(ctx, cached))
	diff, err := storage.CopyDiff(ctx, cached)
	require.NoError(t, err)
	assert.Empty(t, diff)
}

// TestEtcdWatchCacheWalkFunctionErrorsAreTheCallers: an error of a walk's
// function, whatever its class, is returned as given, not checked against
// etcd as a refusal of the store's (which, on this stale copy, would run
// the walk again).
func TestEtcdWatchCacheWalkFunctionErrorsAreTheCallers(t *testing.T) {
	_, cached := cacheStale(t)
	mine := fmt.Errorf("the caller's own: %w", errdefs.ErrNotFound)
	ctx, tx, err := cached.TransactionContext(context.Background(), true)
	require.NoError(t, err)
	defer tx.Rollback()
	calls := 0
	err = storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { calls++; return mine })
	assert.Same(t, mine, err)
	assert.Equal(t, 1, calls, "the walk ran once: nothing ran it again")
}
