package storage_test

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// openParallel opens a bbolt store with parallel callbacks.
func openParallel(t testing.TB) storage.MetaStore {
	t.Helper()
	ms := openBolt(t, t.TempDir(), storage.WithParallelCallbacks())
	require.True(t, storage.ParallelCallbacks(ms))
	return ms
}

func TestBoltParallelOptionOnlyWhereGiven(t *testing.T) {
	if storage.ParallelByDefault() {
		t.Skip("every store is parallel in this run")
	}
	assert.False(t, storage.ParallelCallbacks(openBolt(t, t.TempDir())))
	assert.True(t, storage.ParallelCallbacks(openBolt(t, t.TempDir(), storage.WithParallelCallbacks())))
}

// TestBoltParallelCallbacksRunSideBySide: callbacks that sleep run at the
// same time, and every write lands.
func TestBoltParallelCallbacksRunSideBySide(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	const writers, each, work = 16, 4, 20 * time.Millisecond
	var inside, most atomic.Int32
	start := time.Now()
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
					n := inside.Add(1)
					defer inside.Add(-1)
					for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
					}
					key := fmt.Sprintf("w%d-%d", w, i)
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key+"-x", ""); err != nil {
						return err
					}
					time.Sleep(work) // the driver's filesystem work
					_, err := storage.CommitActive(ctx, key+"-x", key, snapshots.Usage{Size: 1})
					return err
				})
				assert.NoError(t, err)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	serial := writers * each * work
	t.Logf("%d callbacks of %v: %v (serially at least %v); at most %d at once", writers*each, work, elapsed, serial, most.Load())
	assert.Greater(t, most.Load(), int32(writers/2), "callbacks ran side by side")
	assert.Less(t, elapsed, serial/3)
	ids, err := idMap(ms)
	require.NoError(t, err)
	assert.Len(t, ids, writers*each)
	requireCheckClean(t, ms)
}

// TestBoltParallelRaceForOneName: writers that create one name at once end
// with exactly one success and AlreadyExists for the others, never a
// conflict; each callback runs at most twice.
func TestBoltParallelRaceForOneName(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	for round := range 20 {
		const racers = 16
		name := fmt.Sprintf("k%d", round)
		var ok, exists atomic.Int32
		runs := make([]atomic.Int32, racers)
		var wg sync.WaitGroup
		gate := make(chan struct{})
		for r := range racers {
			wg.Go(func() {
				<-gate
				err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
					runs[r].Add(1)
					time.Sleep(2 * time.Millisecond)
					_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "")
					return err
				})
				switch {
				case err == nil:
					ok.Add(1)
				case errdefs.IsAlreadyExists(err):
					exists.Add(1)
				default:
					t.Errorf("racer %d: unexpected %v", r, err)
				}
			})
		}
		close(gate)
		wg.Wait()
		require.Equal(t, int32(1), ok.Load(), "round %d: one success", round)
		require.Equal(t, int32(racers-1), exists.Load(), "round %d: AlreadyExists for the others", round)
		for r := range racers {
			assert.LessOrEqual(t, runs[r].Load(), int32(2), "racer %d ran its callback at most twice", r)
		}
		requireCheckClean(t, ms)
	}
}

// TestBoltParallelCreatesRaceRemovesOfParent: creates of children race
// with removes of their parent. Only serial answers: a parent is removed
// exactly when no create on it succeeded.
func TestBoltParallelCreatesRaceRemovesOfParent(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	for round := range 10 {
		const parents, children = 4, 6
		update(t, ms, func(ctx context.Context) error {
			for p := range parents {
				if err := commitLayer(ctx, fmt.Sprintf("r%d-p%d", round, p), ""); err != nil {
					return err
				}
			}
			return nil
		})
		var (
			wg      sync.WaitGroup
			created [parents]atomic.Int32
			removed [parents]atomic.Bool
		)
		gate := make(chan struct{})
		for p := range parents {
			parent := fmt.Sprintf("r%d-p%d", round, p)
			wg.Go(func() {
				<-gate
				err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
					time.Sleep(time.Millisecond)
					_, _, err := storage.Remove(ctx, parent)
					return err
				})
				switch {
				case err == nil:
					removed[p].Store(true)
				case errdefs.IsFailedPrecondition(err):
				default:
					t.Errorf("remove %s: unexpected %v", parent, err)
				}
			})
			for c := range children {
				wg.Go(func() {
					<-gate
					err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
						time.Sleep(time.Duration(c%3) * time.Millisecond)
						_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("%s-c%d", parent, c), parent)
						return err
					})
					switch {
					case err == nil:
						created[p].Add(1)
					case errdefs.IsNotFound(err):
					default:
						t.Errorf("create on %s: unexpected %v", parent, err)
					}
				})
			}
		}
		close(gate)
		wg.Wait()
		for p := range parents {
			assert.Equal(t, removed[p].Load(), created[p].Load() == 0,
				"round %d parent %d: removed %v, %d children created", round, p, removed[p].Load(), created[p].Load())
		}
		requireCheckClean(t, ms)
	}
}

// TestBoltParallelMixedWithTransactionContext: parallel callbacks race
// with ordinary transactions (TransactionContext) over the same names:
// answers stay serial, IDs unique, and the store checks clean.
func TestBoltParallelMixedWithTransactionContext(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	const names = 8
	var created, refused atomic.Int32
	var wg sync.WaitGroup
	for w := range 12 {
		wg.Go(func() {
			for i := range 20 {
				name := fmt.Sprintf("n%d", (w+i)%names)
				create := func(ctx context.Context) error {
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "base"); err != nil {
						return err
					}
					time.Sleep(time.Millisecond)
					return nil
				}
				removeIt := func(ctx context.Context) error {
					_, _, err := storage.Remove(ctx, name)
					return err
				}
				fn := create
				if i%2 == 1 {
					fn = removeIt
				}
				var err error
				if w%3 == 0 {
					tctx, tx, berr := ms.TransactionContext(ctx, true)
					require.NoError(t, berr)
					if err = fn(tctx); err == nil {
						err = tx.Commit()
					} else {
						_ = tx.Rollback()
					}
				} else {
					err = ms.WithTransaction(ctx, true, fn)
				}
				switch {
				case err == nil:
					created.Add(1)
				case errdefs.IsAlreadyExists(err), errdefs.IsNotFound(err):
					refused.Add(1)
				default:
					t.Errorf("unexpected %v", err)
				}
			}
		})
	}
	wg.Wait()
	t.Logf("%d applied, %d refused", created.Load(), refused.Load())
	ids, err := idMap(ms)
	require.NoError(t, err)
	assert.LessOrEqual(t, len(ids), names+1)
	requireCheckClean(t, ms)
}

// TestBoltParallelFailedCallbacksApplyNothing: a callback that writes and
// then fails, panics or calls runtime.Goexit leaves no trace, and the
// store goes on serving the others.
func TestBoltParallelFailedCallbacksApplyNothing(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	errFail := errors.New("fail")
	write := func(ctx context.Context, name string) {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "")
		require.NoError(t, err)
	}
	err := ms.WithTransaction(ctx, true, func(ctx context.Context) error { write(ctx, "failed"); return errFail })
	require.ErrorIs(t, err, errFail)
	require.PanicsWithValue(t, "boom", func() {
		_ = ms.WithTransaction(ctx, true, func(ctx context.Context) error { write(ctx, "panicked"); panic("boom") })
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ms.WithTransaction(ctx, true, func(ctx context.Context) error { write(ctx, "exited"); runtime.Goexit(); return nil })
	}()
	<-done
	// Others go on, in parallel, also while one of them panics.
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			if i == 3 {
				assert.Panics(t, func() {
					_ = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
						write(ctx, "panicked-too")
						time.Sleep(time.Millisecond)
						panic("boom")
					})
				})
				return
			}
			assert.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
				write(ctx, fmt.Sprintf("ok%d", i))
				time.Sleep(time.Millisecond)
				return nil
			}))
		})
	}
	wg.Wait()
	ids, err := idMap(ms)
	require.NoError(t, err)
	names := map[string]bool{}
	for _, n := range ids {
		names[n] = true
	}
	assert.Len(t, names, 7)
	for _, n := range []string{"failed", "panicked", "exited", "panicked-too"} {
		assert.False(t, names[n], "%s left a trace", n)
	}
	requireCheckClean(t, ms)
	// Nothing holds bbolt's locks: the store closes at once.
	require.NoError(t, ms.Close())
}

// TestBoltParallelWalkSeesOwnWrites: a callback that walks after writing
// (the serial path) sees its own writes, and a nested read-only transaction
// works while a nested writable one is refused.
func TestBoltParallelWalkSeesOwnWrites(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	runs := 0
	var seen []string
	require.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		runs++
		seen = nil
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "mine", "base"); err != nil {
			return err
		}
		return storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			seen = append(seen, info.Name)
			return nil
		})
	}))
	assert.Equal(t, []string{"base", "mine"}, seen)
	assert.Equal(t, 1, runs, "the walk went on serially, without a second run")

	require.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "other", "base"); err != nil {
			return err
		}
		err := ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, "base")
			return err
		})
		if err != nil {
			return err
		}
		assert.ErrorIs(t, ms.WithTransaction(ctx, true, func(context.Context) error { return nil }), storage.ErrNestedWrite)
		problems, err := storage.Check(ctx, ms)
		assert.Empty(t, problems)
		return err
	}))
	requireCheckClean(t, ms)
}

// TestBoltParallelIDsUniqueAndCovered: IDs drawn by parallel callbacks and
// by ordinary transactions never collide; the snapshots bucket's sequence
// covers them after a reopen, in either mode.
func TestBoltParallelIDsUniqueAndCovered(t *testing.T) {
	dir := t.TempDir()
	ms := openBolt(t, dir, storage.WithParallelCallbacks())
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 10 {
				name := fmt.Sprintf("w%d-%d", w, i)
				fn := func(ctx context.Context) error { return commitLayer(ctx, name, "") }
				if w%2 == 0 {
					tctx, tx, err := ms.TransactionContext(ctx, true)
					require.NoError(t, err)
					require.NoError(t, fn(tctx))
					require.NoError(t, tx.Commit())
					continue
				}
				assert.NoError(t, ms.WithTransaction(ctx, true, fn))
			}
		})
	}
	wg.Wait()
	ids, err := idMap(ms)
	require.NoError(t, err)
	assert.Len(t, ids, 80)
	requireCheckClean(t, ms)
	require.NoError(t, ms.Close())

	for _, opts := range [][]storage.BoltOpt{nil, {storage.WithParallelCallbacks()}} {
		ms := openBolt(t, dir, opts...)
		var s storage.Snapshot
		update(t, ms, func(ctx context.Context) error {
			s, err = storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("after-%d", len(opts)), "")
			return err
		})
		_, taken := ids[s.ID]
		assert.False(t, taken, "ID %s reused", s.ID)
		ids[s.ID] = "after"
		requireCheckClean(t, ms)
		require.NoError(t, ms.Close())
	}
}

// TestBoltParallelWalkAfterAStaleReadRunsAgain: a callback read a name, a
// commit changed it, then the callback walks: it cannot go on on the
// shared transaction (its read is stale), so it runs again, and the answer
// is a serial store's.
func TestBoltParallelWalkAfterAStaleReadRunsAgain(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "x", "") })
	read, changed := make(chan struct{}), make(chan struct{})
	var runs int
	var labels []string
	done := make(chan error, 1)
	go func() {
		done <- ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			runs++
			_, info, _, err := storage.GetInfo(ctx, "x")
			if err != nil {
				return err
			}
			if runs == 1 {
				close(read)
				<-changed
			}
			labels = append(labels, info.Labels["v"])
			if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "x", Labels: map[string]string{"v": info.Labels["v"] + "+a"}}, "labels.v"); err != nil {
				return err
			}
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
		})
	}()
	<-read
	update(t, ms, func(ctx context.Context) error {
		_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "x", Labels: map[string]string{"v": "b"}}, "labels.v")
		return err
	})
	close(changed)
	require.NoError(t, <-done)
	assert.Equal(t, 2, runs)
	assert.Equal(t, []string{"", "b"}, labels)
	require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, "x")
		assert.Equal(t, "b+a", info.Labels["v"])
		return err
	}))
	requireCheckClean(t, ms)
}

// TestBoltParallelPromotedCallbackFails: a callback that walked (and so
// went on on the group's transaction) and then fails, panics or calls
// runtime.Goexit has its writes undone, and a writer alongside commits.
func TestBoltParallelPromotedCallbackFails(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	walk := func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
	}
	errFail := errors.New("fail")
	for _, end := range []string{"error", "panic", "goexit"} {
		var wg sync.WaitGroup
		wg.Go(func() {
			call := func() error {
				return ms.WithTransaction(ctx, true, func(ctx context.Context) error {
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "doomed-"+end, ""); err != nil {
						return err
					}
					if err := walk(ctx); err != nil {
						return err
					}
					time.Sleep(2 * time.Millisecond)
					switch end {
					case "panic":
						panic("boom")
					case "goexit":
						runtime.Goexit()
					}
					return errFail
				})
			}
			switch end {
			case "panic":
				assert.PanicsWithValue(t, "boom", func() { _ = call() })
			case "goexit":
				done := make(chan struct{})
				go func() { defer close(done); _ = call() }()
				<-done
			default:
				assert.ErrorIs(t, call(), errFail)
			}
		})
		wg.Go(func() {
			assert.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
				time.Sleep(time.Millisecond)
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "kept-"+end, "")
				return err
			}))
		})
		wg.Wait()
	}
	ids, err := idMap(ms)
	require.NoError(t, err)
	names := map[string]bool{}
	for _, n := range ids {
		names[n] = true
	}
	assert.Equal(t, map[string]bool{"kept-error": true, "kept-panic": true, "kept-goexit": true}, names)
	requireCheckClean(t, ms)
}

// TestBoltParallelRecoveredRestart: a callback abandoned at promotion that
// recovers the panic finds its transaction done, and runs again serially.
func TestBoltParallelRecoveredRestart(t *testing.T) {
	ms := openParallel(t)
	ctx := context.Background()
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "x", "") })
	read, changed := make(chan struct{}), make(chan struct{})
	runs := 0
	var afterRecover error
	done := make(chan error, 1)
	go func() {
		done <- ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			runs++
			if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "x", Labels: map[string]string{"by": "a"}}, "labels.by"); err != nil {
				return err
			}
			if runs == 1 {
				close(read)
				<-changed
				func() {
					defer func() { _ = recover() }()
					_ = storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
				}()
				_, _, _, afterRecover = storage.GetInfo(ctx, "x")
				return nil
			}
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
		})
	}()
	<-read
	update(t, ms, func(ctx context.Context) error {
		_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "x", Labels: map[string]string{"other": "b"}}, "labels.other")
		return err
	})
	close(changed)
	require.NoError(t, <-done)
	assert.Equal(t, 2, runs)
	assert.ErrorIs(t, afterRecover, storage.ErrTransactionDone)
	require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, "x")
		assert.Equal(t, map[string]string{"by": "a", "other": "b"}, info.Labels)
		return err
	}))
	requireCheckClean(t, ms)
}
