package storage_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// This file proves ReleaseHost (issue 13): an operator empties the scope
// of a host that is gone, in batches, freeing exactly the IDs no other
// host still binds.

// relFixture fills host a's scope with more snapshots than one batch of
// ReleaseHost removes: a chain deeper than a batch, several chains with
// actives and views on them, and shared layers in each role. It returns
// the IDs whose data ReleaseHost must free, and those it must keep.
func relFixture(t *testing.T, a, b, c storage.MetaStore) (free, keep []string) {
	t.Helper()
	add := func(id string, err error) {
		require.NoError(t, err)
		free = append(free, id)
	}
	update(t, a, func(ctx context.Context) error {
		parent := ""
		for i := range 23 {
			name := fmt.Sprintf("deep%d", i)
			s, err := createActive(ctx, name+"-a", parent, nil)
			require.NoError(t, err)
			_, err = storage.CommitActive(ctx, name+"-a", name, snapshots.Usage{})
			add(s.ID, err)
			parent = name
		}
		for c := range 4 {
			parent := ""
			for i := range 3 {
				name := fmt.Sprintf("c%d-%d", c, i)
				s, err := createActive(ctx, name+"-a", parent, nil)
				require.NoError(t, err)
				_, err = storage.CommitActive(ctx, name+"-a", name, snapshots.Usage{})
				add(s.ID, err)
				parent = name
			}
			s, err := createActive(ctx, fmt.Sprintf("c%d-work", c), parent, map[string]string{storage.KeyUpperdir: "/u"})
			add(s.ID, err)
			s, err = storage.CreateSnapshot(ctx, snapshots.KindView, fmt.Sprintf("c%d-view", c), parent)
			add(s.ID, err)
		}
		return nil
	})
	// Shared layers: one a alone holds (freed), one b binds too (kept),
	// with a child of a's on it (freed).
	update(t, a, func(ctx context.Context) error {
		id, err := commitShared(ctx, "mine", "deep22", "chain-mine")
		add(id, err)
		id, err = commitShared(ctx, "shared", "", "chain-shared")
		require.NoError(t, err)
		keep = append(keep, id)
		s, err := createActive(ctx, "on-shared", "shared", nil)
		add(s.ID, err)
		return nil
	})
	update(t, b, func(ctx context.Context) error {
		_, err := storage.BindLayer(ctx, "b/shared", "", "chain-shared")
		require.NoError(t, err)
		id, err := commitShared(ctx, "b/layer", "", "chain-b")
		require.NoError(t, err)
		keep = append(keep, id)
		return nil
	})
	// a binds b's layer (kept: b binds it still) and c's, whose own
	// binding c releases (freed: a holds the last reference).
	update(t, c, func(ctx context.Context) error {
		_, err := commitShared(ctx, "c/layer", "", "chain-c")
		return err
	})
	update(t, a, func(ctx context.Context) error {
		if _, err := storage.BindLayer(ctx, "bound-b", "", "chain-b"); err != nil {
			return err
		}
		_, err := storage.BindLayer(ctx, "bound-c", "", "chain-c")
		return err
	})
	var cID string
	require.NoError(t, a.WithTransaction(context.Background(), false, func(ctx context.Context) (err error) {
		cID, _, _, err = storage.GetInfo(ctx, "bound-c")
		return err
	}))
	_, last, err := release(c, "c/layer")
	require.NoError(t, err)
	require.False(t, last)
	free = append(free, cID)
	return free, keep
}

// scopeKeys returns the records and children-index keys of host's scope.
// The deletion markers stay when a scope is emptied: deleting them would
// hide the removals from the guards of a walk still open on the scope.
func scopeKeys(t testing.TB, root, host string) []string {
	var keys []string
	scope := storage.KeyEtcdScopes + "/" + host + "/"
	for _, k := range rootKeys(t, root) {
		if strings.HasPrefix(k, scope+storage.KeyEtcdSnapshots+"/") || strings.HasPrefix(k, scope+storage.KeyEtcdChildren+"/") {
			keys = append(keys, k)
		}
	}
	return keys
}

func TestEtcdReleaseHostEmptiesAGoneHostsScope(t *testing.T) {
	root := uniqueRoot(t)
	a, b, c := hostStore(t, root, "a"), hostStore(t, root, "b"), hostStore(t, root, "c")
	free, keep := relFixture(t, a, b, c)
	require.Greater(t, len(free), 40)
	requireClean(t, a)

	va, err := openHost(t, root, storage.WithHostView("a"))
	require.NoError(t, err)
	before := rootKeys(t, root)
	freed, err := storage.ReleaseHost(context.Background(), va, false)
	require.ErrorIs(t, err, storage.ErrHostAlive)
	assert.True(t, errdefs.IsFailedPrecondition(err))
	assert.Empty(t, freed)
	assert.Equal(t, before, rootKeys(t, root), "refused while alive: nothing changed")

	require.NoError(t, a.Close())
	freed, err = storage.ReleaseHost(context.Background(), va, false)
	require.NoError(t, err)
	slices.Sort(freed)
	slices.Sort(free)
	assert.Equal(t, free, freed, "frees the host's own data and the layers it held last")
	for _, id := range keep {
		assert.NotContains(t, freed, id, "a layer another host binds is not freed")
		assert.Contains(t, rootKeys(t, root), "layers/"+id)
	}
	assert.Empty(t, scopeKeys(t, root, "a"), "the scope is gone, records and children index")
	_, found := hostInfo(t, root, "a")
	assert.False(t, found, "the host is forgotten")
	_, found = hostInfo(t, root, "b")
	assert.True(t, found)
	requireClean(t, b)

	// b's bindings are whole: the last reference of each is b's own.
	for _, name := range []string{"b/shared", "b/layer"} {
		_, last, err := release(b, name)
		require.NoError(t, err)
		assert.True(t, last, name)
	}
	requireClean(t, b)

	// Again: nothing left to do.
	freed, err = storage.ReleaseHost(context.Background(), va, false)
	require.NoError(t, err)
	assert.Empty(t, freed)

	// The host may come back, with an empty scope.
	a2, err := openHost(t, root, storage.WithHost("a"))
	require.NoError(t, err)
	require.NoError(t, a2.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		m, err := storage.IDMap(ctx)
		assert.Empty(t, m)
		return err
	}))
}

func TestEtcdReleaseHostForcedWhileAlive(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	var ids []string
	update(t, a, func(ctx context.Context) error {
		parent := ""
		for i := range 25 {
			s, err := createActive(ctx, fmt.Sprintf("l%d-a", i), parent, nil)
			require.NoError(t, err)
			ids = append(ids, s.ID)
			_, err = storage.CommitActive(ctx, fmt.Sprintf("l%d-a", i), fmt.Sprintf("l%d", i), snapshots.Usage{})
			require.NoError(t, err)
			parent = fmt.Sprintf("l%d", i)
		}
		return nil
	})
	va, err := openHost(t, root, storage.WithHostView("a"))
	require.NoError(t, err)
	freed, err := storage.ReleaseHost(context.Background(), va, true)
	require.NoError(t, err)
	slices.Sort(freed)
	slices.Sort(ids)
	assert.Equal(t, ids, freed)
	assert.Empty(t, scopeKeys(t, root, "a"))
	h, found := hostInfo(t, root, "a")
	assert.True(t, found && h.Alive, "a live host is not forgotten")
	requireClean(t, b)
	// The live store finds its scope empty and goes on.
	update(t, a, func(ctx context.Context) error { return commitLayer(ctx, "fresh", "") })
}

func TestEtcdReleaseHostNeedsAHostScopedStore(t *testing.T) {
	plain := openEtcd(t, uniqueRoot(t))
	update(t, plain, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	_, err := storage.ReleaseHost(context.Background(), plain, true)
	assert.ErrorIs(t, err, storage.ErrNotScoped)
	require.NoError(t, plain.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, "base")
		return err
	}))
}

// TestEtcdReleaseHostRacesATakeOver: an operator releases a gone host while
// another host takes over its active. The active's data is either freed
// (and the takeover finds nothing) or taken over (and not freed), never
// both: the taker would run on a directory the operator deletes.
func TestEtcdReleaseHostRacesATakeOver(t *testing.T) {
	root := uniqueRoot(t)
	b := hostStore(t, root, "b")
	outcomes := map[string]int{}
	for i := range 30 {
		host := fmt.Sprintf("g%d", i)
		g := hostStore(t, root, host)
		var id string
		update(t, g, func(ctx context.Context) error {
			for j := range 5 {
				if _, err := createActive(ctx, fmt.Sprintf("other%d", j), "", nil); err != nil {
					return err
				}
			}
			s, err := createActive(ctx, "work", "", nil)
			id = s.ID
			return err
		})
		require.NoError(t, g.Close())
		view, err := openHost(t, root, storage.WithHostView(host))
		require.NoError(t, err)

		start := make(chan struct{})
		var freed []string
		var errRelease, errTake error
		done := make(chan struct{}, 2)
		go func() {
			<-start
			freed, errRelease = storage.ReleaseHost(context.Background(), view, false)
			done <- struct{}{}
		}()
		go func() {
			<-start
			errTake = b.WithTransaction(context.Background(), true, func(ctx context.Context) error {
				_, err := storage.TakeOver(ctx, host, "work", "work-"+host, "")
				return err
			})
			done <- struct{}{}
		}()
		close(start)
		<-done
		<-done
		require.NoError(t, errRelease, "round %d", i)
		switch {
		case errTake == nil:
			outcomes["taken"]++
			assert.NotContains(t, freed, id, "round %d: freed the data of a snapshot taken over", i)
			require.NoError(t, b.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				got, _, _, err := storage.GetInfo(ctx, "work-"+host)
				assert.Equal(t, id, got)
				return err
			}))
		case errdefs.IsNotFound(errTake):
			outcomes["released"]++
			assert.Contains(t, freed, id, "round %d", i)
		default:
			t.Fatalf("round %d: takeover: %v", i, errTake)
		}
		want := 6 // five others and work
		if errTake == nil {
			want = 5
		}
		assert.Len(t, freed, want, "round %d: the host's other actives are freed", i)
		_, found := hostInfo(t, root, host)
		assert.False(t, found)
		requireClean(t, b)
	}
	t.Logf("outcomes: %v", outcomes)
}
