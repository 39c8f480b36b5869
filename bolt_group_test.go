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
		if storage.ParallelCallbacks(ms) {
			// Parallel callbacks may run again (serially) once.
			assert.LessOrEqual(t, n, 2, "callback of %s ran at most twice", name)
			continue
		}
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
		// Undone creates gave their IDs back, as rollbacks would have
		// (with parallel callbacks, drawn IDs are skipped).
		for i := 1; i <= len(wants)+1 && !storage.ParallelCallbacks(ms); i++ {
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
	if storage.ParallelCallbacks(ms) {
		assert.Equal(t, "2", s.ID, "parallel callbacks skip a drawn ID")
		return
	}
	assert.Equal(t, "1", s.ID)
}

// hangBound is how long the tests of hangs wait before they call it one.
const hangBound = 10 * time.Second

// within runs fn on another goroutine and fails the test if fn has not
// returned after d: the defects these tests guard against are hangs, which
// would otherwise end only with the test binary's timeout. fn must not call
// t.FailNow (use assert).
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s: still running after %v (hung)", what, d)
	}
}

// TestBoltGroupCommitSurvivesACallbackThatExitsItsGoroutine: a callback
// that calls runtime.Goexit (t.FailNow, require) in a group is treated as a
// failed one: its writes are undone, the other members commit and return,
// its goroutine still exits, and the store closes.
func TestBoltGroupCommitSurvivesACallbackThatExitsItsGoroutine(t *testing.T) {
	for _, tc := range []struct {
		name string
		// writers that enter the group before the exiting one, and that
		// queue for the group while it runs.
		before, after int
	}{
		{"first of its group, others queue behind it", 0, 3},
		{"last of its group, so it commits for the others", 1, 0},
		{"between others", 2, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms := openBolt(t, t.TempDir())
			ctx := context.Background()
			update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })

			// Time for writers just started to queue for the group's lock.
			const queue = 50 * time.Millisecond
			var (
				mu        sync.Mutex
				committed = map[string]bool{}
				returned  atomic.Bool
			)
			within(t, hangBound, "writers sharing a group with a callback that calls runtime.Goexit", func() {
				var wg sync.WaitGroup
				write := func(name string, inside func()) {
					wg.Go(func() {
						err := ms.WithTransaction(ctx, true, func(ctx context.Context) error {
							_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "base")
							inside()
							return err
						})
						if assert.NoError(t, err, name) {
							mu.Lock()
							committed[name] = true
							mu.Unlock()
						}
					})
				}
				beforeIn, exiterStarted := make(chan struct{}), make(chan struct{})
				var beforeOnce sync.Once
				for i := range tc.before {
					write(fmt.Sprintf("before-%d", i), func() {
						beforeOnce.Do(func() { close(beforeIn) })
						<-exiterStarted
						time.Sleep(queue)
					})
				}
				if tc.before > 0 {
					<-beforeIn
				}
				exiterIn, afterStarted, exited := make(chan struct{}), make(chan struct{}), make(chan struct{})
				go func() {
					defer close(exited)
					_ = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
						if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "exiter", "base"); err != nil {
							return err
						}
						close(exiterIn)
						<-afterStarted
						time.Sleep(queue)
						runtime.Goexit()
						return nil
					})
					returned.Store(true)
				}()
				close(exiterStarted)
				<-exiterIn
				for i := range tc.after {
					write(fmt.Sprintf("after-%d", i), func() {})
				}
				close(afterStarted)
				wg.Wait()
				<-exited
			})

			assert.False(t, returned.Load(), "WithTransaction returned to a callback that called runtime.Goexit")
			assert.Len(t, committed, tc.before+tc.after)
			require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				got := map[string]bool{}
				ids := map[string]bool{}
				err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
					id, _, _, err := storage.GetInfo(ctx, info.Name)
					ids[id] = true
					if info.Name != "base" {
						got[info.Name] = true
					}
					return err
				})
				assert.Equal(t, committed, got, "exactly the writes of the callers that returned are there")
				// The undone create gave its ID back, as a rollback does
				// (with parallel callbacks, drawn IDs are skipped).
				for i := 1; i <= len(committed)+1 && !storage.ParallelCallbacks(ms); i++ {
					assert.True(t, ids[fmt.Sprint(i)], "ID %d is in use", i)
				}
				return err
			}))
			problems, err := storage.Check(ctx, ms)
			require.NoError(t, err)
			assert.Empty(t, problems)
			within(t, hangBound, "Close", func() { assert.NoError(t, ms.Close()) })
		})
	}
}

// TestBoltNestedWritableTransactionIsRefused: a writable transaction
// started with the context of an open transaction of the same bbolt store
// would wait for itself (bbolt has one writer; a writer that grows the file
// waits for every reader), so it is refused with ErrNestedWrite. Nested
// read-only transactions are fine, and so is a context whose transaction
// has ended.
func TestBoltNestedWritableTransactionIsRefused(t *testing.T) {
	bg := context.Background()
	outers := []struct {
		name     string
		writable bool
		// run calls fn inside a transaction; a writable one creates
		// "outer" and commits.
		run func(ms storage.MetaStore, fn func(ctx context.Context)) error
	}{
		{"writable WithTransaction", true, func(ms storage.MetaStore, fn func(context.Context)) error {
			return ms.WithTransaction(bg, true, func(ctx context.Context) error {
				fn(ctx)
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "outer", "")
				return err
			})
		}},
		{"read-only WithTransaction", false, func(ms storage.MetaStore, fn func(context.Context)) error {
			return ms.WithTransaction(bg, false, func(ctx context.Context) error {
				fn(ctx)
				return nil
			})
		}},
		{"writable TransactionContext", true, func(ms storage.MetaStore, fn func(context.Context)) error {
			ctx, tx, err := ms.TransactionContext(bg, true)
			if err != nil {
				return err
			}
			fn(ctx)
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "outer", ""); err != nil {
				_ = tx.Rollback()
				return err
			}
			return tx.Commit()
		}},
		{"read-only TransactionContext", false, func(ms storage.MetaStore, fn func(context.Context)) error {
			ctx, tx, err := ms.TransactionContext(bg, false)
			if err != nil {
				return err
			}
			fn(ctx)
			return tx.Rollback()
		}},
	}
	inners := []struct {
		name     string
		writable bool
		run      func(ctx context.Context, ms storage.MetaStore) error
	}{
		{"writable WithTransaction", true, func(ctx context.Context, ms storage.MetaStore) error {
			return ms.WithTransaction(ctx, true, func(ctx context.Context) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "inner", "")
				return err
			})
		}},
		{"writable TransactionContext", true, func(ctx context.Context, ms storage.MetaStore) error {
			ctx, tx, err := ms.TransactionContext(ctx, true)
			if err != nil {
				return err
			}
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "inner", ""); err != nil {
				_ = tx.Rollback()
				return err
			}
			return tx.Commit()
		}},
		{"read-only WithTransaction", false, func(ctx context.Context, ms storage.MetaStore) error {
			return ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				_, err := storage.IDMap(ctx)
				return err
			})
		}},
	}
	for _, outer := range outers {
		for _, inner := range inners {
			t.Run(inner.name+" in "+outer.name, func(t *testing.T) {
				ms := openBolt(t, t.TempDir())
				var outerErr, innerErr error
				within(t, hangBound, "nested transaction", func() {
					outerErr = outer.run(ms, func(ctx context.Context) { innerErr = inner.run(ctx, ms) })
				})
				require.NoError(t, outerErr, "the outer transaction goes on after the refusal")
				if inner.writable {
					assert.ErrorIs(t, innerErr, storage.ErrNestedWrite)
					assert.True(t, errdefs.IsFailedPrecondition(innerErr), "class of %v", innerErr)
				} else {
					assert.NoError(t, innerErr)
				}
				ids, err := idMap(ms)
				require.NoError(t, err)
				var names []string
				for _, name := range ids {
					names = append(names, name)
				}
				if outer.writable {
					assert.Equal(t, []string{"outer"}, names, "the outer write is committed, the refused one is not there")
				} else {
					assert.Empty(t, names)
				}
			})
		}
	}

	t.Run("the context of an ended transaction may start a writable one", func(t *testing.T) {
		ms := openBolt(t, t.TempDir())
		ctx, tx, err := ms.TransactionContext(bg, false)
		require.NoError(t, err)
		require.NoError(t, tx.Rollback())
		within(t, hangBound, "writable transaction after the outer one ended", func() {
			assert.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "later", "")
				return err
			}))
		})
	})
}

// TestBoltGroupCommitArrivalsDuringACommitGetTheirOwnAnswers holds a
// group's commit until a second group of callers has queued behind it
// (their first waits for bbolt's writer, the others for the group), so
// that the second group forms while the first is being committed. Each
// caller of the second group gets the answer a serial store would give
// it, whatever its neighbours do, and the second group commits once.
func TestBoltGroupCommitArrivalsDuringACommitGetTheirOwnAnswers(t *testing.T) {
	ms := openBolt(t, t.TempDir())
	if storage.ParallelCallbacks(ms) {
		t.Skip("parallel callbacks form groups otherwise")
	}
	ctx := context.Background()
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })

	errOwn := errors.New("own failure")
	create := func(name string) func(ctx context.Context) error {
		return hostileCreate(snapshots.KindActive, name, "base")
	}
	isErr := func(want error) func(t *testing.T, err error, panicked any) {
		return func(t *testing.T, err error, panicked any) {
			assert.Nil(t, panicked)
			assert.ErrorIs(t, err, want)
		}
	}
	nilOrExists := func(t *testing.T, err error, panicked any) {
		assert.Nil(t, panicked)
		if err != nil {
			assert.True(t, errdefs.IsAlreadyExists(err), "%v", err)
		}
	}
	second := []struct {
		name  string
		fn    func(ctx context.Context) error
		check func(t *testing.T, err error, panicked any)
		// exists says which names are there afterwards, and which not.
		exists map[string]bool
	}{
		{"succeeds", create("new"), isErr(nil), map[string]bool{"new": true}},
		{"fails after writing", func(ctx context.Context) error {
			if err := create("undone")(ctx); err != nil {
				return err
			}
			return errOwn
		}, isErr(errOwn), map[string]bool{"undone": false}},
		{"creates what the first group created", create("first"), isErr(errdefs.ErrAlreadyExists), map[string]bool{"first": true}},
		{"commits a missing active", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "missing", "never", snapshots.Usage{})
			return err
		}, isErr(errdefs.ErrNotFound), map[string]bool{"never": false}},
		{"removes a parent", func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, "base")
			return err
		}, isErr(errdefs.ErrFailedPrecondition), map[string]bool{"base": true}},
		{"panics after writing", func(ctx context.Context) error {
			if err := create("panicked")(ctx); err != nil {
				return err
			}
			panic("boom")
		}, func(t *testing.T, err error, panicked any) {
			assert.Equal(t, "boom", panicked)
		}, map[string]bool{"panicked": false}},
		{"creates a name another member creates (a)", create("twice"), nilOrExists, map[string]bool{"twice": true}},
		{"creates a name another member creates (b)", create("twice"), nilOrExists, map[string]bool{"twice": true}},
	}

	var (
		once     sync.Once
		wg       sync.WaitGroup
		errs     = make([]error, len(second))
		panicked = make([]any, len(second))
	)
	storage.SetBeforeGroupCommit(ms, func() {
		once.Do(func() {
			for i, tc := range second {
				wg.Go(func() {
					defer func() { panicked[i] = recover() }()
					errs[i] = ms.WithTransaction(ctx, true, tc.fn)
				})
			}
			// One of them waits for bbolt's writer, which the group
			// about to commit holds; the others wait for the group.
			for deadline := time.Now().Add(10 * time.Second); storage.GroupWaiting(ms) < len(second)-1; time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Error("the second group's callers never queued behind the first group")
					break
				}
			}
		})
	})
	c0, s0 := storage.GroupCommits(ms)
	update(t, ms, create("first"))
	wg.Wait()
	c1, s1 := storage.GroupCommits(ms)
	assert.Equal(t, int64(2), c1-c0, "the first group and the second committed once each")
	// The first group's one caller, and the second group's two that
	// succeed ("succeeds" and one of "twice").
	assert.Equal(t, int64(1+2), s1-s0, "shares committed")

	successes := 0
	for i, tc := range second {
		t.Run(tc.name, func(t *testing.T) {
			tc.check(t, errs[i], panicked[i])
			require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				for name, want := range tc.exists {
					_, _, _, err := storage.GetInfo(ctx, name)
					assert.Equal(t, want, err == nil, "%s exists: %v", name, err)
				}
				return nil
			}))
		})
		if errs[i] == nil && panicked[i] == nil {
			successes++
		}
	}
	assert.Equal(t, 2, successes, `"succeeds" and one of "twice" succeed`)
	problems, err := storage.Check(ctx, ms)
	require.NoError(t, err)
	assert.Empty(t, problems)
}

// TestBoltGroupCommitLoneWriterCommitsAlone: one writer's calls, one after
// the other, are each committed on their own, at once: no call waits to
// share its commit with a later one (counted, not timed).
func TestBoltGroupCommitLoneWriterCommitsAlone(t *testing.T) {
	errOwn := errors.New("own failure")
	create := func(name string) func(ctx context.Context) error {
		return hostileCreate(snapshots.KindActive, name, "")
	}
	for _, tc := range []struct {
		name        string
		calls       []func(ctx context.Context) error
		wantCommits int64
	}{
		{"one write", []func(ctx context.Context) error{create("a")}, 1},
		{"writes", []func(ctx context.Context) error{create("a"), create("b"), create("c")}, 3},
		{"a failure commits nothing", []func(ctx context.Context) error{
			create("a"), func(ctx context.Context) error { _ = create("b")(ctx); return errOwn }, create("c"),
		}, 2},
		{"a refused write commits nothing", []func(ctx context.Context) error{create("a"), create("a")}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms := openBolt(t, t.TempDir())
			if storage.ParallelCallbacks(ms) {
				t.Skip("parallel callbacks that write nothing join no group")
			}
			ctx := context.Background()
			for i, call := range tc.calls {
				before, _ := storage.GroupCommits(ms)
				err := ms.WithTransaction(ctx, true, call)
				after, _ := storage.GroupCommits(ms)
				if err == nil {
					assert.Equal(t, before+1, after, "call %d committed before it returned", i)
				} else {
					assert.Equal(t, before, after, "call %d (%v) committed nothing", i, err)
				}
			}
			commits, shares := storage.GroupCommits(ms)
			assert.Equal(t, tc.wantCommits, commits)
			assert.Equal(t, commits, shares, "every commit carried one caller")
		})
	}
}
