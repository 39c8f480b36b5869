package storage_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/testsuite"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEtcdHostScopedConformance(t *testing.T) {
	testsuite.MetaStoreSuite(t, "etcd-host", func(t testing.TB, root string) (storage.MetaStore, error) {
		cfg := etcdServer(t).ClientConfig()
		return storage.NewEtcdStore(root, &cfg, storage.WithHost("host-a"))
	})
}

// TestEtcdHostScopesRunTheSuiteSideBySide runs the conformance suite twice
// at once, as two hosts of the same roots: each subtest of one run shares
// its root with the same subtest of the other, and neither sees the other.
func TestEtcdHostScopesRunTheSuiteSideBySide(t *testing.T) {
	run := uniqueRoot(t) // apart from other runs (-count)
	var mu sync.Mutex
	hostsOf := map[string]map[string]bool{} // shared root -> hosts that opened it
	t.Run("group", func(t *testing.T) {
		for _, host := range []string{"host-a", "host-b"} {
			t.Run(host, func(t *testing.T) {
				t.Parallel()
				var roots sync.Map // root -> the shared root it maps to
				testsuite.MetaStoreSuite(t, "suite", func(tb testing.TB, root string) (storage.MetaStore, error) {
					// The same subtest of the other host's run maps to the
					// same root; a root opened again (in a nested subtest,
					// say) keeps the root it first mapped to.
					first := run + "/" + strings.Replace(tb.Name(), "/"+host+"/", "/", 1) + "/" + filepath.Base(root)
					mapped, _ := roots.LoadOrStore(root, first)
					shared := mapped.(string)
					mu.Lock()
					if hostsOf[shared] == nil {
						hostsOf[shared] = map[string]bool{}
					}
					hostsOf[shared][host] = true
					mu.Unlock()
					cfg := etcdServer(tb).ClientConfig()
					return storage.NewEtcdStore(shared, &cfg, storage.WithHost(host))
				})
			})
		}
	})
	both := 0
	for _, hosts := range hostsOf {
		if len(hosts) == 2 {
			both++
		}
	}
	// Control: the runs did share their roots.
	assert.Greater(t, both, len(hostsOf)*9/10, "roots opened by both hosts, of %d", len(hostsOf))
}

// hostStore opens host's scope of root. Its lease has the default TTL,
// long enough that a loaded machine never lets it expire by accident.
func hostStore(t testing.TB, root, host string) storage.MetaStore {
	t.Helper()
	return openEtcd(t, root, storage.WithHost(host))
}

func requireClean(t testing.TB, ms storage.MetaStore) {
	t.Helper()
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	require.Empty(t, problems)
}

func TestEtcdSharedLayerLivesUntilItsLastBindingIsReleased(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	var base, top string
	update(t, a, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x1", ""); err != nil {
			return err
		}
		var err error
		if base, err = storage.CommitShared(ctx, "x1", "a/base", "chain-1", snapshots.Usage{Size: 10}); err != nil {
			return err
		}
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x2", "a/base"); err != nil {
			return err
		}
		top, err = storage.CommitShared(ctx, "x2", "a/top", "chain-2", snapshots.Usage{Size: 20})
		return err
	})
	requireClean(t, a)
	update(t, b, func(ctx context.Context) error {
		info, err := storage.BindLayer(ctx, "b/base", "", "chain-1")
		require.NoError(t, err)
		assert.Equal(t, snapshots.KindCommitted, info.Kind)
		_, err = storage.BindLayer(ctx, "b/wrong", "", "chain-2")
		assert.True(t, errdefs.IsNotFound(err), "a layer on another parent is not found: %v", err)
		_, err = storage.BindLayer(ctx, "b/top", "b/base", "chain-2")
		require.NoError(t, err)
		id, info, usage, err := storage.GetInfo(ctx, "b/top")
		require.NoError(t, err)
		assert.Equal(t, top, id)
		assert.Equal(t, "b/base", info.Parent)
		assert.Equal(t, int64(20), usage.Size)
		s, err := storage.CreateSnapshot(ctx, snapshots.KindView, "b/view", "b/top")
		require.NoError(t, err)
		assert.Equal(t, []string{top, base}, s.ParentIDs)
		_, _, err = storage.Remove(ctx, "b/view")
		return err
	})
	requireClean(t, b)
	update(t, a, func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, "a/top")
		assert.ErrorIs(t, err, storage.ErrShared)
		id, _, last, err := storage.Release(ctx, "a/top")
		require.NoError(t, err)
		assert.Equal(t, top, id)
		assert.False(t, last, "b still binds the layer")
		return nil
	})
	// The callback may run more than once: the answer that counts is
	// the committed one.
	var last bool
	update(t, b, func(ctx context.Context) (err error) {
		_, _, last, err = storage.Release(ctx, "b/top")
		return err
	})
	assert.True(t, last)
	requireClean(t, a)
}

func TestEtcdTakeOverMovesAnActiveOfAGoneHost(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	var id string
	update(t, a, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x1", ""); err != nil {
			return err
		}
		if _, err := storage.CommitShared(ctx, "x1", "a/base", "chain-1", snapshots.Usage{}); err != nil {
			return err
		}
		s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a/work", "a/base",
			snapshots.WithLabels(map[string]string{storage.KeyUpperdir: "/shared/7/fs"}))
		id = s.ID
		return err
	})
	update(t, b, func(ctx context.Context) error {
		_, err := storage.BindLayer(ctx, "b/base", "", "chain-1")
		return err
	})
	err := b.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		got, err := storage.GetActiveSnapshot(ctx, "a", "a/work")
		require.NoError(t, err)
		assert.True(t, got.Alive)
		assert.Equal(t, "/shared/7/fs", got.Upperdir)
		_, err = storage.TakeOver(ctx, "a", "a/work", "b/work", "b/base")
		return err
	})
	require.ErrorIs(t, err, storage.ErrHostAlive)
	require.NoError(t, a.Close())
	update(t, b, func(ctx context.Context) error {
		s, err := storage.TakeOver(ctx, "a", "a/work", "b/work", "b/base")
		require.NoError(t, err)
		assert.Equal(t, id, s.ID)
		return nil
	})
	requireClean(t, b)
}

// TestEtcdHostViewConformance runs the suite on operator views of a host
// scope (no lease, an allocator of their own), in pages of one key, so that
// every walk crosses pages inside the scope's range.
func TestEtcdHostViewConformance(t *testing.T) {
	testsuite.MetaStoreSuite(t, "etcd-host-view", func(t testing.TB, root string) (storage.MetaStore, error) {
		cfg := etcdServer(t).ClientConfig()
		// The host's own store makes the root host-scoped once; it stays
		// open beside the views, as a live host's store does.
		owner, err := storage.NewEtcdStore(root, &cfg, storage.WithHost("host-a"))
		switch {
		case err == nil:
			t.Cleanup(func() { _ = owner.Close() })
		case !errors.Is(err, storage.ErrHostAlive):
			return nil, err
		}
		return storage.NewEtcdStore(root, &cfg, storage.WithHostView("host-a"), storage.WithPageSize(1))
	})
}
