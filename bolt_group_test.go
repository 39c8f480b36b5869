package storage_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// TestBoltGroupCommitIsolatesFailingCallbacks runs many concurrent writers
// through WithTransaction, so that they share commits, where every third
// callback writes and then fails and one panics: the failures leave no
// trace, every other caller's writes are there, and each callback ran once.
func TestBoltGroupCommitIsolatesFailingCallbacks(t *testing.T) {
	ms := openBolt(t, t.TempDir())
	ctx := context.Background()
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })

	const writers, each = 16, 25
	errFail := errors.New("callback fails after writing")
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		runs  = map[string]int{}
		wants = map[string]bool{}
	)
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				name := fmt.Sprintf("w%d-%d", w, i)
				fail := (w+i)%3 == 0
				panics := w == 5 && i == 7
				call := func() error {
					return ms.WithTransaction(ctx, true, func(ctx context.Context) error {
						mu.Lock()
						runs[name]++
						mu.Unlock()
						if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "base"); err != nil {
							return err
						}
						if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"last": name}}); err != nil {
							return err
						}
						if panics {
							panic("boom")
						}
						if fail {
							return errFail
						}
						return nil
					})
				}
				if panics {
					assert.PanicsWithValue(t, "boom", func() { _ = call() })
					continue
				}
				err := call()
				if fail {
					assert.ErrorIs(t, err, errFail)
					continue
				}
				if assert.NoError(t, err) {
					mu.Lock()
					wants[name] = true
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()

	for name, n := range runs {
		assert.Equal(t, 1, n, "callback of %s ran once", name)
	}
	require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		got := map[string]bool{}
		ids := map[string]bool{}
		err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Name != "base" {
				got[info.Name] = true
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			assert.False(t, ids[id], "ID %s is unique", id)
			ids[id] = true
			return err
		})
		assert.Equal(t, wants, got, "exactly the successful callers' snapshots exist")
		// Undone creates gave their IDs back, as rollbacks would have.
		for i := 1; i <= len(wants)+1; i++ {
			assert.True(t, ids[fmt.Sprint(i)], "ID %d is in use", i)
		}
		_, info, _, _ := storage.GetInfo(ctx, "base")
		assert.True(t, wants[info.Labels["last"]], "the last label update came from a successful caller, got %q", info.Labels["last"])
		return err
	}))
	problems, err := storage.Check(ctx, ms)
	require.NoError(t, err)
	assert.Empty(t, problems)
}

// TestBoltGroupCommitUndoLeavesTheFileAsARollbackWould: a failed callback
// on an empty store leaves not even the layout buckets behind, and the next
// ID is the one a rollback would have left.
func TestBoltGroupCommitUndoLeavesTheFileAsARollbackWould(t *testing.T) {
	ms := openBolt(t, t.TempDir())
	ctx := context.Background()
	errFail := errors.New("fail")
	err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		if err := commitLayer(ctx, "base", ""); err != nil {
			return err
		}
		return errFail
	})
	require.ErrorIs(t, err, errFail)
	var s storage.Snapshot
	update(t, ms, func(ctx context.Context) error {
		s, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "first", "")
		return err
	})
	assert.Equal(t, "1", s.ID)
}
