package storage_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// This file proves takeover of active snapshots between hosts (issue 13).

// toFixture is a root where host a has a shared base layer, an active
// "a/work" on it (with an upperdir label), a parentless active "a/lone", a
// view "a/view" and an unshared committed "a/other"; host b binds the base
// as "b/base", has its own layer "b/other" and a snapshot "b/taken".
type toFixture struct {
	root         string
	a, b         storage.MetaStore
	baseID       string
	workID       string
	loneID       string
	otherLayerID string
}

func newTOFixture(t *testing.T) *toFixture {
	t.Helper()
	f := &toFixture{root: uniqueRoot(t)}
	f.a, f.b = hostStore(t, f.root, "a"), hostStore(t, f.root, "b")
	update(t, f.a, func(ctx context.Context) error {
		if _, err := createActive(ctx, "x", "", nil); err != nil {
			return err
		}
		var err error
		if f.baseID, err = storage.CommitShared(ctx, "x", "a/base", "chain-base", snapshots.Usage{Size: 1}); err != nil {
			return err
		}
		s, err := createActive(ctx, "a/work", "a/base", map[string]string{storage.KeyUpperdir: "/shared/work/fs", "app": "db"})
		if err != nil {
			return err
		}
		f.workID = s.ID
		if s, err = createActive(ctx, "a/lone", "", nil); err != nil {
			return err
		}
		f.loneID = s.ID
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindView, "a/view", "a/base"); err != nil {
			return err
		}
		return commitLayer(ctx, "a/other", "")
	})
	update(t, f.b, func(ctx context.Context) error {
		if _, err := storage.BindLayer(ctx, "b/base", "", "chain-base"); err != nil {
			return err
		}
		if _, err := createActive(ctx, "y", "", nil); err != nil {
			return err
		}
		var err error
		if f.otherLayerID, err = storage.CommitShared(ctx, "y", "b/other", "chain-other", snapshots.Usage{}); err != nil {
			return err
		}
		_, err = createActive(ctx, "b/taken", "", nil)
		return err
	})
	requireClean(t, f.b)
	return f
}

func (f *toFixture) takeOver(t *testing.T, force bool, key, name, parent string) (storage.Snapshot, error) {
	t.Helper()
	var s storage.Snapshot
	err := f.b.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		var err error
		if force {
			s, err = storage.ForceTakeOver(ctx, "a", key, name, parent)
		} else {
			s, err = storage.TakeOver(ctx, "a", key, name, parent)
		}
		return err
	})
	return s, err
}

// assertMoved checks that a's work snapshot now lives in b's scope as
// b/work, with its ID and labels, and that a's scope holds neither it nor
// the children-index link from a/base.
func (f *toFixture) assertMoved(t *testing.T) {
	t.Helper()
	require.NoError(t, f.b.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		id, info, _, err := storage.GetInfo(ctx, "b/work")
		require.NoError(t, err)
		assert.Equal(t, f.workID, id, "the snapshot keeps its ID")
		assert.Equal(t, snapshots.KindActive, info.Kind)
		assert.Equal(t, "b/base", info.Parent)
		assert.Equal(t, "/shared/work/fs", info.Labels[storage.KeyUpperdir])
		assert.Equal(t, "db", info.Labels["app"])
		s, err := storage.GetSnapshot(ctx, "b/work")
		require.NoError(t, err)
		assert.Equal(t, []string{f.baseID}, s.ParentIDs)
		return nil
	}))
	view, err := openHost(t, f.root, storage.WithHostView("a"))
	require.NoError(t, err)
	require.NoError(t, view.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, "a/work")
		assert.True(t, errdefs.IsNotFound(err), "a's scope no longer has it: %v", err)
		m, err := storage.IDMap(ctx)
		require.NoError(t, err)
		assert.NotContains(t, m, f.workID)
		return nil
	}))
	assert.NotContains(t, rootKeys(t, f.root), "scopes/a/children/a%2Fbase/"+f.workID, "the owner's children index drops the link")
	assert.Contains(t, rootKeys(t, f.root), "scopes/b/children/b%2Fbase/"+f.workID, "the taker's children index has it")
	requireClean(t, f.b)
}

func TestEtcdTakeOverIsRefusedWhileTheOwnerLives(t *testing.T) {
	f := newTOFixture(t)
	before := rootKeys(t, f.root)
	err := f.b.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		a, err := storage.GetActiveSnapshot(ctx, "a", "a/work")
		require.NoError(t, err)
		assert.Equal(t, storage.ActiveSnapshot{Host: "a", Alive: true, Name: "a/work", Kind: snapshots.KindActive,
			ID: f.workID, Parent: "a/base", ParentIDs: []string{f.baseID},
			Labels:   map[string]string{storage.KeyUpperdir: "/shared/work/fs", "app": "db"},
			Upperdir: "/shared/work/fs"}, a)
		v, err := storage.GetActiveSnapshot(ctx, "a", "a/view")
		require.NoError(t, err)
		assert.Equal(t, snapshots.KindView, v.Kind)
		return nil
	})
	require.NoError(t, err)
	_, err = f.takeOver(t, false, "a/work", "b/work", "b/base")
	require.ErrorIs(t, err, storage.ErrHostAlive)
	assert.True(t, errdefs.IsFailedPrecondition(err))
	assert.Equal(t, before, rootKeys(t, f.root), "nothing changed")
	// The owner goes on using it.
	update(t, f.a, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, "a/work", "a/work-done", snapshots.Usage{})
		return err
	})
}

func TestEtcdTakeOverAfterTheOwnerClosed(t *testing.T) {
	f := newTOFixture(t)
	require.NoError(t, f.a.Close())
	err := f.b.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		a, err := storage.GetActiveSnapshot(ctx, "a", "a/work")
		assert.False(t, a.Alive)
		return err
	})
	require.NoError(t, err)
	s, err := f.takeOver(t, false, "a/work", "b/work", "b/base")
	require.NoError(t, err)
	assert.Equal(t, f.workID, s.ID)
	assert.Equal(t, snapshots.KindActive, s.Kind)
	assert.Equal(t, []string{f.baseID}, s.ParentIDs)
	f.assertMoved(t)

	// The moved snapshot works as any of b's: it commits on b's base.
	update(t, f.b, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, "b/work", "b/work-done", snapshots.Usage{})
		return err
	})
	// A parentless active and a view move too.
	s, err = f.takeOver(t, false, "a/lone", "b/lone", "")
	require.NoError(t, err)
	assert.Equal(t, f.loneID, s.ID)
	s, err = f.takeOver(t, false, "a/view", "b/view", "b/base")
	require.NoError(t, err)
	assert.Equal(t, snapshots.KindView, s.Kind)
	requireClean(t, f.b)
}

func TestEtcdTakeOverAfterTheOwnerExpired(t *testing.T) {
	root := uniqueRoot(t)
	var id string
	gone := vanish(t, root, "a", func(ctx context.Context) error {
		s, err := createActive(ctx, "a/work", "", map[string]string{storage.KeyUpperdir: "/u"})
		id = s.ID
		return err
	})
	b := hostStore(t, root, "b")
	take := func() (storage.Snapshot, error) {
		var s storage.Snapshot
		err := b.WithTransaction(context.Background(), true, func(ctx context.Context) (err error) {
			s, err = storage.TakeOver(ctx, "a", "a/work", "b/work", "")
			return err
		})
		return s, err
	}
	_, err := take()
	require.ErrorIs(t, err, storage.ErrHostAlive, "alive until the TTL runs out")
	waitHostGone(t, root, "a", 15*time.Second)
	s, err := take()
	require.NoError(t, err)
	assert.Equal(t, id, s.ID)
	requireClean(t, b)
	_ = gone.Close() // its client is closed: it may not revoke its lease
}

func TestEtcdForceTakeOverWhileTheOwnerLives(t *testing.T) {
	f := newTOFixture(t)
	s, err := f.takeOver(t, true, "a/work", "b/work", "b/base")
	require.NoError(t, err)
	assert.Equal(t, f.workID, s.ID)
	f.assertMoved(t)
	// The owner sees it gone.
	err = f.a.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, "a/work", "a/work-done", snapshots.Usage{})
		return err
	})
	assert.True(t, errdefs.IsNotFound(err), "%v", err)
}

func TestEtcdTakeOverRefusals(t *testing.T) {
	f := newTOFixture(t)
	require.NoError(t, f.a.Close())
	before := rootKeys(t, f.root)
	for _, tc := range []struct {
		name                 string
		key, newName, parent string
		class                func(error) bool
		className            string
	}{
		{"committed snapshot", "a/base", "b/base2", "", errdefs.IsFailedPrecondition, "FailedPrecondition"},
		{"unshared committed snapshot", "a/other", "b/other2", "", errdefs.IsFailedPrecondition, "FailedPrecondition"},
		{"parent bound to another layer", "a/work", "b/work", "b/other", errdefs.IsFailedPrecondition, "FailedPrecondition"},
		{"parent not given", "a/work", "b/work", "", errdefs.IsFailedPrecondition, "FailedPrecondition"},
		{"parent that is an active", "a/work", "b/work", "b/taken", errdefs.IsInvalidArgument, "InvalidArgument"},
		{"missing parent", "a/work", "b/work", "b/nothing", errdefs.IsNotFound, "NotFound"},
		{"parent given to a parentless snapshot", "a/lone", "b/lone", "b/base", errdefs.IsInvalidArgument, "InvalidArgument"},
		{"taken name", "a/work", "b/taken", "b/base", errdefs.IsAlreadyExists, "AlreadyExists"},
		{"taken name of a bound layer", "a/lone", "b/base", "", errdefs.IsAlreadyExists, "AlreadyExists"},
		{"missing snapshot", "a/nothing", "b/work", "b/base", errdefs.IsNotFound, "NotFound"},
		{"name of the taker's scope", "b/taken", "b/work", "", errdefs.IsNotFound, "NotFound"},
		{"empty new name", "a/work", "", "b/base", errdefs.IsInvalidArgument, "InvalidArgument"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, force := range []bool{false, true} {
				_, err := f.takeOver(t, force, tc.key, tc.newName, tc.parent)
				assert.True(t, tc.class(err), "force=%v: want %s, got %v", force, tc.className, err)
			}
		})
	}
	err := f.b.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, err := storage.TakeOver(ctx, "b", "b/taken", "b/again", "")
		assert.True(t, errdefs.IsInvalidArgument(err), "a host taking over its own: %v", err)
		_, err = storage.GetActiveSnapshot(ctx, "a", "a/base")
		assert.True(t, errdefs.IsFailedPrecondition(err), "GetActiveSnapshot of a committed: %v", err)
		_, err = storage.GetActiveSnapshot(ctx, "a", "a/nothing")
		assert.True(t, errdefs.IsNotFound(err), "GetActiveSnapshot of a missing: %v", err)
		return nil
	})
	require.NoError(t, err)
	assert.Equal(t, before, rootKeys(t, f.root), "no refusal changed anything")
	requireClean(t, f.b)

	// On a store without host scopes.
	plain := openEtcd(t, uniqueRoot(t))
	err = plain.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, err := storage.TakeOver(ctx, "a", "x", "y", "")
		return err
	})
	assert.ErrorIs(t, err, storage.ErrNotScoped)
}

// TestEtcdTakeOverRaceHasOneWinner: several hosts take over one snapshot
// of a gone host at once; exactly one gets it, the others NotFound.
func TestEtcdTakeOverRaceHasOneWinner(t *testing.T) {
	root := uniqueRoot(t)
	a := hostStore(t, root, "a")
	update(t, a, func(ctx context.Context) error {
		if _, err := createActive(ctx, "x", "", nil); err != nil {
			return err
		}
		_, err := storage.CommitShared(ctx, "x", "base", "chain-base", snapshots.Usage{})
		return err
	})
	require.NoError(t, a.Close())
	// The gone host's scope is written through an operator's view.
	va, err := openHost(t, root, storage.WithHostView("a"))
	require.NoError(t, err)
	takers := []string{"b", "c", "d", "e"}
	stores := map[string]storage.MetaStore{}
	for _, h := range takers {
		stores[h] = hostStore(t, root, h)
		update(t, stores[h], func(ctx context.Context) error {
			_, err := storage.BindLayer(ctx, h+"/base", "", "chain-base")
			return err
		})
	}
	const rounds = 30
	wins := map[string]int{}
	for i := range rounds {
		key := fmt.Sprintf("work%d", i)
		parent := "base"
		if i%3 == 2 {
			parent = ""
		}
		var id string
		update(t, va, func(ctx context.Context) error {
			s, err := createActive(ctx, key, parent, map[string]string{storage.KeyUpperdir: "/u/" + key})
			id = s.ID
			return err
		})
		start := make(chan struct{})
		errs := make([]error, len(takers))
		var wg sync.WaitGroup
		for j, h := range takers {
			wg.Go(func() {
				<-start
				errs[j] = stores[h].WithTransaction(context.Background(), true, func(ctx context.Context) error {
					p := ""
					if parent != "" {
						p = h + "/base"
					}
					s, err := storage.TakeOver(ctx, "a", key, "taken-"+key, p)
					if err == nil && s.ID != id {
						return fmt.Errorf("moved with ID %s, not %s", s.ID, id)
					}
					return err
				})
			})
		}
		close(start)
		wg.Wait()
		winner := ""
		for j, err := range errs {
			if err == nil {
				require.Empty(t, winner, "round %d: %s and %s both took it over", i, winner, takers[j])
				winner = takers[j]
				continue
			}
			require.True(t, errdefs.IsNotFound(err), "round %d: loser %s: %v", i, takers[j], err)
		}
		require.NotEmpty(t, winner, "round %d: nobody took it over: %v", i, errs)
		wins[winner]++
		require.NoError(t, stores[winner].WithTransaction(context.Background(), false, func(ctx context.Context) error {
			got, info, _, err := storage.GetInfo(ctx, "taken-"+key)
			assert.Equal(t, id, got)
			assert.Equal(t, "/u/"+key, info.Labels[storage.KeyUpperdir])
			return err
		}))
		requireClean(t, va)
	}
	t.Logf("wins over %d rounds: %v", rounds, wins)
}

// TestEtcdForceTakeOverRacesTheOwnersCommit: a live owner commits its
// active while an operator force-moves it; exactly one of them gets it.
func TestEtcdForceTakeOverRacesTheOwnersCommit(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	wins := map[string]int{}
	for i := range 30 {
		key := fmt.Sprintf("work%d", i)
		update(t, a, func(ctx context.Context) error { _, err := createActive(ctx, key, "", nil); return err })
		errCommit, errTake := raceRetry(a, b,
			func(ctx context.Context) error {
				_, err := storage.CommitActive(ctx, key, "done-"+key, snapshots.Usage{})
				return err
			},
			func(ctx context.Context) error {
				_, err := storage.ForceTakeOver(ctx, "a", key, "taken-"+key, "")
				return err
			})
		switch {
		case errCommit == nil && errdefs.IsNotFound(errTake):
			wins["commit"]++
		case errTake == nil && errdefs.IsNotFound(errCommit):
			wins["takeover"]++
		default:
			t.Fatalf("round %d: commit %v, takeover %v", i, errCommit, errTake)
		}
		requireClean(t, a)
	}
	t.Logf("wins: %v", wins)
}
