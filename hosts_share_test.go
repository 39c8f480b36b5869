package storage_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// This file proves shared layers across host scopes (issue 13): binding,
// releasing, the refusals of BindLayer, and the races of binding against
// the release of a layer's last other reference and of two hosts
// committing one content key.

// commitShared creates an active and commits it as a shared layer.
func commitShared(ctx context.Context, name, parent, content string) (string, error) {
	if _, err := createActive(ctx, name+"-active", parent, nil); err != nil {
		return "", err
	}
	return storage.CommitShared(ctx, name+"-active", name, content, snapshots.Usage{Size: 7, Inodes: 3})
}

func bind(ms storage.MetaStore, name, parent, content string) (snapshots.Info, error) {
	var info snapshots.Info
	err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) (err error) {
		info, err = storage.BindLayer(ctx, name, parent, content, snapshots.WithLabels(map[string]string{"bound": name}))
		return err
	})
	return info, err
}

func release(ms storage.MetaStore, name string) (id string, last bool, err error) {
	err = ms.WithTransaction(context.Background(), true, func(ctx context.Context) (err error) {
		id, _, last, err = storage.Release(ctx, name)
		return err
	})
	return id, last, err
}

func TestEtcdSharedLayerBindAndReleaseFlow(t *testing.T) {
	root := uniqueRoot(t)
	a, b, c := hostStore(t, root, "a"), hostStore(t, root, "b"), hostStore(t, root, "c")
	var id string
	update(t, a, func(ctx context.Context) (err error) {
		id, err = commitShared(ctx, "a/l", "", "chain-l")
		return err
	})
	layerKey, contentKey := "layers/"+id, "content/chain-l/"+id
	assert.Subset(t, rootKeys(t, root), []string{layerKey, contentKey})

	for _, host := range []struct {
		ms   storage.MetaStore
		name string
	}{{b, "b/l"}, {c, "c/l"}} {
		info, err := bind(host.ms, host.name, "", "chain-l")
		require.NoError(t, err)
		assert.Equal(t, host.name, info.Name)
		assert.Equal(t, snapshots.KindCommitted, info.Kind)
		assert.Equal(t, host.name, info.Labels["bound"], "labels from opts")
		require.NoError(t, host.ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			got, _, usage, err := storage.GetInfo(ctx, host.name)
			assert.Equal(t, id, got, "a binding has the layer's ID")
			assert.Equal(t, snapshots.Usage{Size: 7, Inodes: 3}, usage, "and its usage")
			return err
		}))
	}
	requireClean(t, a)

	// Remove of a binding others reference is refused, changing nothing.
	for _, host := range []struct {
		ms   storage.MetaStore
		name string
	}{{a, "a/l"}, {b, "b/l"}, {c, "c/l"}} {
		before := rootKeys(t, root)
		err := host.ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, host.name)
			return err
		})
		require.ErrorIs(t, err, storage.ErrShared, host.name)
		assert.True(t, errdefs.IsFailedPrecondition(err))
		assert.Equal(t, before, rootKeys(t, root), "refused Remove of %s changed nothing", host.name)
	}

	got, last, err := release(a, "a/l")
	require.NoError(t, err)
	assert.Equal(t, id, got)
	assert.False(t, last, "b and c still bind it")
	_, last, err = release(c, "c/l")
	require.NoError(t, err)
	assert.False(t, last, "b still binds it")
	assert.Subset(t, rootKeys(t, root), []string{layerKey, contentKey})
	requireClean(t, a)

	// b's binding is the last: a plain Remove takes it, and the layer.
	update(t, b, func(ctx context.Context) error {
		got, kind, err := storage.Remove(ctx, "b/l")
		assert.Equal(t, id, got)
		assert.Equal(t, snapshots.KindCommitted, kind)
		return err
	})
	assert.NotContains(t, rootKeys(t, root), layerKey)
	assert.NotContains(t, rootKeys(t, root), contentKey)
	_, err = bind(c, "c/l", "", "chain-l")
	assert.True(t, errdefs.IsNotFound(err), "a layer without bindings is gone: %v", err)
	requireClean(t, a)

	// Release of what is no shared layer frees its data.
	update(t, a, func(ctx context.Context) error {
		if _, err := createActive(ctx, "act", "", nil); err != nil {
			return err
		}
		return commitLayer(ctx, "plain", "")
	})
	for _, name := range []string{"act", "plain"} {
		_, last, err := release(a, name)
		require.NoError(t, err)
		assert.True(t, last, name)
	}
	_, last, err = release(a, "nothing")
	assert.True(t, errdefs.IsNotFound(err), "%v", err)
	assert.False(t, last)
	requireClean(t, a)
}

func TestEtcdSharedLayersNeedHostScopes(t *testing.T) {
	plain := openEtcd(t, uniqueRoot(t))
	update(t, plain, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	err := plain.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, err := createActive(ctx, "x", "", nil)
		require.NoError(t, err)
		_, err = storage.CommitShared(ctx, "x", "l", "chain", snapshots.Usage{})
		assert.ErrorIs(t, err, storage.ErrNotScoped)
		assert.True(t, errdefs.IsNotImplemented(err))
		_, err = storage.BindLayer(ctx, "l2", "", "chain")
		assert.ErrorIs(t, err, storage.ErrNotScoped)
		_, _, last, err := storage.Release(ctx, "base")
		assert.NoError(t, err)
		assert.True(t, last, "Release is Remove on a store without host scopes")
		return nil
	})
	require.NoError(t, err)
}

func TestEtcdBindLayerRefusals(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	update(t, a, func(ctx context.Context) error {
		if _, err := commitShared(ctx, "a/p1", "", "chain-p1"); err != nil {
			return err
		}
		if _, err := commitShared(ctx, "a/p2", "", "chain-p2"); err != nil {
			return err
		}
		_, err := commitShared(ctx, "a/top", "a/p1", "chain-top")
		return err
	})
	update(t, b, func(ctx context.Context) error {
		for _, l := range []struct{ name, content string }{{"b/p1", "chain-p1"}, {"b/p2", "chain-p2"}} {
			if _, err := storage.BindLayer(ctx, l.name, "", l.content); err != nil {
				return err
			}
		}
		if err := commitLayer(ctx, "b/own", ""); err != nil {
			return err
		}
		_, err := createActive(ctx, "b/act", "", nil)
		return err
	})
	before := rootKeys(t, root)
	for _, tc := range []struct {
		name, bindAs, parent, content string
		class                         func(error) bool
		className                     string
	}{
		{"missing content key", "b/x", "", "chain-none", errdefs.IsNotFound, "NotFound"},
		{"parent mismatch", "b/top", "b/p2", "chain-top", errdefs.IsNotFound, "NotFound"},
		{"parent mismatch: base asked, layer has a parent", "b/top", "", "chain-top", errdefs.IsNotFound, "NotFound"},
		{"parent mismatch: parent given, layer is a base", "b/x", "b/p1", "chain-p2", errdefs.IsNotFound, "NotFound"},
		{"parent of the scope that is no shared layer", "b/top", "b/own", "chain-top", errdefs.IsNotFound, "NotFound"},
		{"name taken by a binding", "b/p1", "", "chain-p1", errdefs.IsAlreadyExists, "AlreadyExists"},
		{"name taken by an active", "b/act", "b/p1", "chain-top", errdefs.IsAlreadyExists, "AlreadyExists"},
		{"uncommitted parent", "b/top", "b/act", "chain-top", errdefs.IsInvalidArgument, "InvalidArgument"},
		{"missing parent", "b/top", "b/none", "chain-top", errdefs.IsNotFound, "NotFound"},
		{"parent of the other scope", "b/top", "a/p1", "chain-top", errdefs.IsNotFound, "NotFound"},
		{"empty content key", "b/x", "", "", errdefs.IsInvalidArgument, "InvalidArgument"},
		{"empty name", "", "", "chain-p1", errdefs.IsInvalidArgument, "InvalidArgument"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := bind(b, tc.bindAs, tc.parent, tc.content)
			assert.True(t, tc.class(err), "want %s, got %v", tc.className, err)
		})
	}
	assert.Equal(t, before, rootKeys(t, root), "no refusal changed anything")
	err := a.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, err := createActive(ctx, "x", "", nil)
		require.NoError(t, err)
		_, err = storage.CommitShared(ctx, "x", "a/y", "", snapshots.Usage{})
		assert.True(t, errdefs.IsInvalidArgument(err), "CommitShared with an empty content key: %v", err)
		return nil
	})
	require.NoError(t, err)
	// The right parent binds.
	info, err := bind(b, "b/top", "b/p1", "chain-top")
	require.NoError(t, err)
	assert.Equal(t, "b/p1", info.Parent)
	requireClean(t, a)
}

// raceRetry runs a on ms1 and b on ms2 in WithTransaction at once; each
// first attempt waits, before returning, until the other's has run too,
// so both read before either commits and one of them conflicts and runs
// again.
func raceRetry(ms1, ms2 storage.MetaStore, a, b func(ctx context.Context) error) (error, error) {
	var ready, done sync.WaitGroup
	ready.Add(2)
	done.Add(2)
	errs := make([]error, 2)
	run := func(i int, ms storage.MetaStore, fn func(ctx context.Context) error) {
		defer done.Done()
		first := true
		errs[i] = ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			err := fn(ctx)
			if first {
				first = false
				ready.Done()
				ready.Wait()
			}
			return err
		})
		if first {
			ready.Done()
		}
	}
	go run(0, ms1, a)
	go run(1, ms2, b)
	done.Wait()
	return errs[0], errs[1]
}

const shareRounds = 40

// TestEtcdSharedRaceBindAgainstReleaseOfTheLastReference: a layer is
// never bound once deleted. Either the bind comes first (and the release
// is not the last), or the release does (and the bind finds nothing).
func TestEtcdSharedRaceBindAgainstReleaseOfTheLastReference(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	outcomes := map[string]int{}
	for i := range shareRounds {
		name, content := fmt.Sprintf("l%d", i), fmt.Sprintf("chain-%d", i)
		var id string
		update(t, a, func(ctx context.Context) (err error) {
			id, err = commitShared(ctx, name, "", content)
			return err
		})
		var last bool
		errBind, errRelease := raceRetry(b, a,
			func(ctx context.Context) error {
				_, err := storage.BindLayer(ctx, name, "", content)
				return err
			},
			func(ctx context.Context) (err error) {
				_, _, last, err = storage.Release(ctx, name)
				return err
			})
		require.NoError(t, errRelease, "round %d", i)
		keys := rootKeys(t, root)
		switch {
		case errBind == nil && !last:
			outcomes["bind first"]++
			assert.Contains(t, keys, "layers/"+id)
			_, last, err := release(b, name)
			require.NoError(t, err)
			assert.True(t, last, "round %d: b held the last reference", i)
		case errdefs.IsNotFound(errBind) && last:
			outcomes["release first"]++
			assert.NotContains(t, keys, "layers/"+id)
			assert.NotContains(t, keys, "scopes/b/snapshots/"+name)
		default:
			t.Fatalf("round %d: bind %v, release last=%v: a binding of a deleted layer, or a leaked layer", i, errBind, last)
		}
		requireClean(t, a)
		assert.NotContains(t, rootKeys(t, root), "layers/"+id)
	}
	t.Logf("outcomes over %d rounds: %v", shareRounds, outcomes)
}

// TestEtcdSharedRaceTwoHostsCommitOneContentKey: both commit; a third
// host binds the one with the lowest ID.
func TestEtcdSharedRaceTwoHostsCommitOneContentKey(t *testing.T) {
	root := uniqueRoot(t)
	a, b, c := hostStore(t, root, "a"), hostStore(t, root, "b"), hostStore(t, root, "c")
	for i := range shareRounds {
		content := fmt.Sprintf("chain-%d", i)
		for _, ms := range []storage.MetaStore{a, b} {
			update(t, ms, func(ctx context.Context) error {
				_, err := createActive(ctx, fmt.Sprintf("x%d", i), "", nil)
				return err
			})
		}
		ids := make([]string, 2)
		commit := func(j int) func(ctx context.Context) error {
			return func(ctx context.Context) (err error) {
				ids[j], err = storage.CommitShared(ctx, fmt.Sprintf("x%d", i), fmt.Sprintf("l%d", i), content, snapshots.Usage{})
				return err
			}
		}
		errA, errB := raceRetry(a, b, commit(0), commit(1))
		require.NoError(t, errA, "round %d", i)
		require.NoError(t, errB, "round %d", i)
		require.NotEqual(t, ids[0], ids[1])
		lowest := ids[0]
		if id0, id1 := mustUint(t, ids[0]), mustUint(t, ids[1]); id1 < id0 {
			lowest = ids[1]
		}
		_, err := bind(c, fmt.Sprintf("l%d", i), "", content)
		require.NoError(t, err)
		require.NoError(t, c.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			id, _, _, err := storage.GetInfo(ctx, fmt.Sprintf("l%d", i))
			assert.Equal(t, lowest, id, "round %d: binds the lowest ID of %v", i, ids)
			return err
		}))
		requireClean(t, a)
	}
}

func mustUint(t testing.TB, s string) uint64 {
	t.Helper()
	v, err := strconv.ParseUint(s, 10, 64)
	require.NoError(t, err)
	return v
}

// TestEtcdSharedRaceReleasesOfTheLastTwoReferences: of two hosts releasing
// a layer's last two bindings at once, exactly one is told it was the last.
func TestEtcdSharedRaceReleasesOfTheLastTwoReferences(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	for i := range shareRounds {
		name, content := fmt.Sprintf("l%d", i), fmt.Sprintf("chain-%d", i)
		var id string
		update(t, a, func(ctx context.Context) (err error) {
			id, err = commitShared(ctx, name, "", content)
			return err
		})
		_, err := bind(b, name, "", content)
		require.NoError(t, err)
		lasts := make([]bool, 2)
		rel := func(j int) func(ctx context.Context) error {
			return func(ctx context.Context) (err error) {
				_, _, lasts[j], err = storage.Release(ctx, name)
				return err
			}
		}
		errA, errB := raceRetry(a, b, rel(0), rel(1))
		require.NoError(t, errA, "round %d", i)
		require.NoError(t, errB, "round %d", i)
		require.True(t, lasts[0] != lasts[1], "round %d: exactly one release is the last: %v", i, lasts)
		assert.NotContains(t, rootKeys(t, root), "layers/"+id)
		requireClean(t, a)
	}
}
