package testsuite

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// testRollback: a rolled-back transaction leaves no trace.
func testRollback(t *testing.T, open Opener) {
	run(t, "creates, commits, removes and updates leave no trace", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		before := dump(t, ms)

		ctx, tx := begin(t, ms, true)
		mustCreate(t, ctx, snapshots.KindActive, "rb-new", "committed-1", snapshots.WithLabels(map[string]string{"a": "b"}))
		mustCommit(t, ctx, "active-1", "rb-committed", snapshots.Usage{Size: 10}, snapshots.WithLabels(map[string]string{"c": "d"}))
		mustLayer(t, ctx, "rb-layer", "rb-committed", snapshots.Usage{Size: 20})
		mustRemove(t, ctx, "view-2")
		mustRemove(t, ctx, "active-3")
		mustRemove(t, ctx, "committed-2") // now without children
		_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "committed-1", Labels: map[string]string{"x": "y"}})
		require.NoError(t, err)
		require.NotEqual(t, before, dumpTx(t, ctx), "the transaction should see its own writes")
		require.NoError(t, tx.Rollback())

		assert.Equal(t, before, dump(t, ms), "rollback left a trace")

		// Every name the rolled-back transaction used behaves as before.
		inWrite(t, ms, func(ctx context.Context) {
			mustCreate(t, ctx, snapshots.KindActive, "rb-new", "committed-2")
			mustCommit(t, ctx, "active-1", "rb-committed", snapshots.Usage{})
			_, _, err := storage.Remove(ctx, "committed-2")
			assertClass(t, err, failedPrecondition, "committed-2 still has its children")
		})
	})

	run(t, "first transaction on an empty store leaves it empty", func(t *testing.T) {
		ms, _ := openStore(t, open)
		ctx, tx := begin(t, ms, true)
		mustLayer(t, ctx, "first", "", snapshots.Usage{Size: 1})
		mustCreate(t, ctx, snapshots.KindView, "first-view", "first")
		require.NoError(t, tx.Rollback())
		assert.Equal(t, storeState{Snapshots: map[string]snapshotState{}, IDMap: map[string]string{}}, dump(t, ms))
	})
}

// testPersistence: a committed transaction survives Close and reopening the
// same root, and roots are isolated.
func testPersistence(t *testing.T, open Opener) {
	run(t, "every field survives Close and reopen", func(t *testing.T) {
		ms, root := openStore(t, open)
		populate(t, ms)
		var goneID string
		inWrite(t, ms, func(ctx context.Context) {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "active-1", Labels: map[string]string{"updated": "yes"}}, "labels.updated")
			require.NoError(t, err)
			mustCommit(t, ctx, "active-2", "committed-3", snapshots.Usage{Size: 1 << 41, Inodes: 3},
				snapshots.WithLabels(map[string]string{"l": "v"}))
			mustCreate(t, ctx, snapshots.KindActive, "rebase-me", "")
			mustCommit(t, ctx, "rebase-me", "rebased", snapshots.Usage{Size: 8}, snapshots.WithParent("committed-3"))
			mustCreate(t, ctx, snapshots.KindView, "view-3", "rebased")
			goneID = mustCreate(t, ctx, snapshots.KindActive, "gone", "committed-1").ID
			mustRemove(t, ctx, "gone")
		})
		before := dump(t, ms)
		seen := map[string]bool{goneID: true}
		for id := range before.IDMap {
			seen[id] = true
		}

		require.NoError(t, ms.Close())
		ms2 := openAt(t, open, root)
		after := dump(t, ms2)
		assert.Equal(t, before, after, "the reopened store differs")
		for name, s := range after.Snapshots {
			assert.True(t, strings.HasSuffix(s.Created, " UTC"), "Created of %q after reopen is %s", name, s.Created)
			assert.True(t, strings.HasSuffix(s.Updated, " UTC"), "Updated of %q after reopen is %s", name, s.Updated)
		}

		inWrite(t, ms2, func(ctx context.Context) {
			s := mustCreate(t, ctx, snapshots.KindActive, "after-reopen", "committed-3")
			assert.False(t, seen[s.ID], "ID %s handed out again after reopen", s.ID)
			_, _, err := storage.Remove(ctx, "committed-1")
			assertClass(t, err, failedPrecondition, "children survive reopen")
			_, _, err = storage.Remove(ctx, "rebased")
			assertClass(t, err, failedPrecondition, "a rebased parent's children survive reopen")
		})
	})

	run(t, "an empty store reopens empty", func(t *testing.T) {
		ms, root := openStore(t, open)
		require.NoError(t, ms.Close())
		ms2 := openAt(t, open, root)
		assert.Equal(t, storeState{Snapshots: map[string]snapshotState{}, IDMap: map[string]string{}}, dump(t, ms2))
	})

	run(t, "different roots are isolated", func(t *testing.T) {
		msA, _ := openStore(t, open)
		msB, _ := openStore(t, open)
		populate(t, msA)
		beforeA := dump(t, msA)
		assert.Empty(t, dump(t, msB).Snapshots, "a fresh root sees another root's snapshots")
		inWrite(t, msB, func(ctx context.Context) {
			mustCreate(t, ctx, snapshots.KindActive, "active-1", "") // taken in A only
			mustCreate(t, ctx, snapshots.KindActive, "only-in-b", "")
		})
		assert.Equal(t, beforeA, dump(t, msA), "writes to one root reached another")
		assert.Equal(t, []string{"active-1", "only-in-b"}, sorted(keys(dump(t, msB).Snapshots)))
	})
}

// misuseOp is one operation of a transaction, reachable both as a Transactor
// method and as a package-level function. Each write would succeed on the
// standard fixture if it were allowed, so a leak shows in the store.
type misuseOp struct {
	name   string
	write  bool
	viaTx  func(ctx context.Context, tx storage.Transactor) error
	viaPkg func(ctx context.Context) error
}

func noopWalk(context.Context, snapshots.Info) error { return nil }

var misuseOps = []misuseOp{
	{
		name: "GetInfo",
		viaTx: func(ctx context.Context, tx storage.Transactor) error {
			_, _, _, err := tx.GetInfo(ctx, "active-1")
			return err
		},
		viaPkg: func(ctx context.Context) error { _, _, _, err := storage.GetInfo(ctx, "active-1"); return err },
	},
	{
		name:   "WalkInfo",
		viaTx:  func(ctx context.Context, tx storage.Transactor) error { return tx.WalkInfo(ctx, noopWalk) },
		viaPkg: func(ctx context.Context) error { return storage.WalkInfo(ctx, noopWalk) },
	},
	{
		name: "GetSnapshot",
		viaTx: func(ctx context.Context, tx storage.Transactor) error {
			_, err := tx.GetSnapshot(ctx, "active-1")
			return err
		},
		viaPkg: func(ctx context.Context) error { _, err := storage.GetSnapshot(ctx, "active-1"); return err },
	},
	{
		name:   "IDMap",
		viaTx:  func(ctx context.Context, tx storage.Transactor) error { _, err := tx.IDMap(ctx); return err },
		viaPkg: func(ctx context.Context) error { _, err := storage.IDMap(ctx); return err },
	},
	{
		name:  "CreateSnapshot",
		write: true,
		viaTx: func(ctx context.Context, tx storage.Transactor) error {
			_, err := tx.CreateSnapshot(ctx, snapshots.KindActive, "misuse-new", "committed-1")
			return err
		},
		viaPkg: func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "misuse-new", "committed-1")
			return err
		},
	},
	{
		name:  "UpdateInfo",
		write: true,
		viaTx: func(ctx context.Context, tx storage.Transactor) error {
			_, err := tx.UpdateInfo(ctx, snapshots.Info{Name: "active-1", Labels: map[string]string{"misuse": "yes"}}, "labels.misuse")
			return err
		},
		viaPkg: func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "active-1", Labels: map[string]string{"misuse": "yes"}}, "labels.misuse")
			return err
		},
	},
	{
		name:  "Remove",
		write: true,
		viaTx: func(ctx context.Context, tx storage.Transactor) error {
			_, _, err := tx.Remove(ctx, "view-1")
			return err
		},
		viaPkg: func(ctx context.Context) error { _, _, err := storage.Remove(ctx, "view-1"); return err },
	},
	{
		name:  "CommitActive",
		write: true,
		viaTx: func(ctx context.Context, tx storage.Transactor) error {
			_, err := tx.CommitActive(ctx, "active-1", "misuse-committed", snapshots.Usage{Size: 1})
			return err
		},
		viaPkg: func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "active-1", "misuse-committed", snapshots.Usage{Size: 1})
			return err
		},
	},
}

// assertAllRefused runs every operation (only the writes when writesOnly),
// both ways, and checks each is refused with sentinel.
func assertAllRefused(t *testing.T, ctx context.Context, tx storage.Transactor, writesOnly bool, sentinel error) {
	t.Helper()
	for _, op := range misuseOps {
		if writesOnly && !op.write {
			continue
		}
		assertSentinel(t, op.viaTx(ctx, tx), sentinel, failedPrecondition, "Transactor.%s", op.name)
		assertSentinel(t, op.viaPkg(ctx), sentinel, failedPrecondition, "storage.%s", op.name)
	}
}

// testMisuse: every misuse of a transaction or a store is refused with the
// storage sentinel for it and changes nothing.
func testMisuse(t *testing.T, open Opener) {
	run(t, "writes in a read-only transaction are ErrReadOnly", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		before := dump(t, ms)
		ctx, tx := begin(t, ms, false)
		assertAllRefused(t, ctx, tx, true, storage.ErrReadOnly)
		assert.Equal(t, before, dumpTx(t, ctx), "a refused write is visible in its transaction")
		for _, op := range misuseOps {
			if !op.write {
				assert.NoError(t, op.viaPkg(ctx), "read %s after refused writes", op.name)
			}
		}
		assertSentinel(t, tx.Commit(), storage.ErrReadOnly, failedPrecondition, "Commit of a read-only transaction")
		assert.NoError(t, tx.Rollback(), "Rollback ends a read-only transaction after a refused Commit")
		assert.Equal(t, before, dump(t, ms))
	})

	run(t, "every method after Commit is ErrTransactionDone", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		ctx, tx := begin(t, ms, true)
		mustCreate(t, ctx, snapshots.KindView, "committed-view", "committed-1")
		require.NoError(t, tx.Commit())
		before := dump(t, ms)
		assertAllRefused(t, ctx, tx, false, storage.ErrTransactionDone)
		assertSentinel(t, tx.Commit(), storage.ErrTransactionDone, failedPrecondition, "second Commit")
		assertSentinel(t, tx.Rollback(), storage.ErrTransactionDone, failedPrecondition, "Rollback after Commit")
		assert.Equal(t, before, dump(t, ms))
		assert.Contains(t, before.Snapshots, "committed-view")
	})

	for _, writable := range []bool{true, false} {
		run(t, fmt.Sprintf("every method after Rollback is ErrTransactionDone (writable=%v)", writable), func(t *testing.T) {
			ms, _ := openStore(t, open)
			populate(t, ms)
			before := dump(t, ms)
			ctx, tx := begin(t, ms, writable)
			if writable {
				mustCreate(t, ctx, snapshots.KindView, "rolled-back-view", "committed-1")
			}
			require.NoError(t, tx.Rollback())
			assertAllRefused(t, ctx, tx, false, storage.ErrTransactionDone)
			assertSentinel(t, tx.Commit(), storage.ErrTransactionDone, failedPrecondition, "Commit after Rollback")
			assertSentinel(t, tx.Rollback(), storage.ErrTransactionDone, failedPrecondition, "second Rollback")
			assert.Equal(t, before, dump(t, ms))
		})
	}

	for _, end := range []string{"Commit", "Rollback"} {
		run(t, fmt.Sprintf("a walk whose callback calls %s ends with ErrTransactionDone", end), func(t *testing.T) {
			ms, _ := openStore(t, open)
			populate(t, ms)
			before := dump(t, ms)
			ctx, tx := begin(t, ms, true)
			visited := 0
			err := storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error {
				visited++
				if end == "Commit" {
					return tx.Commit()
				}
				return tx.Rollback()
			})
			assertSentinel(t, err, storage.ErrTransactionDone, failedPrecondition, "WalkInfo after its callback's "+end)
			assert.Equal(t, 1, visited, "the walk went on after its transaction ended")
			assert.Equal(t, before, dump(t, ms))
		})
	}

	run(t, "package functions without a transaction are ErrNoTransaction", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		before := dump(t, ms)
		type otherKey struct{}
		for _, ctx := range []context.Context{
			context.Background(),
			context.WithValue(context.Background(), otherKey{}, "not a transaction"),
		} {
			for _, op := range misuseOps {
				assertSentinel(t, op.viaPkg(ctx), storage.ErrNoTransaction, failedPrecondition, "storage.%s", op.name)
			}
		}
		assert.Equal(t, before, dump(t, ms))
	})

	run(t, "closed store is ErrClosed and Close twice is nil", func(t *testing.T) {
		ms, root := openStore(t, open)
		populate(t, ms)
		before := dump(t, ms)
		require.NoError(t, ms.Close())
		assert.NoError(t, ms.Close(), "second Close")
		for _, writable := range []bool{true, false} {
			_, tx, err := ms.TransactionContext(context.Background(), writable)
			assertSentinel(t, err, storage.ErrClosed, failedPrecondition, "TransactionContext(writable=%v) after Close", writable)
			if tx != nil {
				_ = tx.Rollback()
			}
			calls := 0
			err = ms.WithTransaction(context.Background(), writable, func(ctx context.Context) error {
				calls++
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "after-close", "")
				return err
			})
			assertSentinel(t, err, storage.ErrClosed, failedPrecondition, "WithTransaction(writable=%v) after Close", writable)
			assert.Zero(t, calls, "WithTransaction ran its callback on a closed store")
		}
		ms2 := openAt(t, open, root)
		assert.Equal(t, before, dump(t, ms2))
	})

	run(t, "canceled context is refused with its error", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		before := dump(t, ms)

		canceled, cancel := context.WithCancel(context.Background())
		cancel()
		_, tx, err := ms.TransactionContext(canceled, true)
		assert.ErrorIs(t, err, context.Canceled, "TransactionContext on a canceled context")
		if tx != nil {
			_ = tx.Rollback()
		}
		calls := 0
		err = ms.WithTransaction(canceled, true, func(context.Context) error { calls++; return nil })
		assert.ErrorIs(t, err, context.Canceled, "WithTransaction on a canceled context")
		assert.Zero(t, calls)

		parent, cancel := context.WithCancel(context.Background())
		ctx, tx, err := ms.TransactionContext(parent, true)
		require.NoError(t, err)
		t.Cleanup(func() { _ = tx.Rollback() })
		cancel()
		for _, op := range misuseOps {
			assert.ErrorIs(t, op.viaTx(ctx, tx), context.Canceled, "Transactor.%s after cancel", op.name)
			assert.ErrorIs(t, op.viaPkg(ctx), context.Canceled, "storage.%s after cancel", op.name)
		}
		assert.NoError(t, tx.Rollback())
		assert.Equal(t, before, dump(t, ms))
	})
}

// testWithTransaction: WithTransaction commits on nil, rolls back on error
// and never commits a read-only transaction; the callback's transaction is
// over when it returns.
func testWithTransaction(t *testing.T, open Opener) {
	errBoom := errors.New("boom")

	run(t, "commits when the callback returns nil", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		var inside context.Context
		err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			inside = ctx
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "wt-active", "committed-1"); err != nil {
				return err
			}
			_, err := storage.CommitActive(ctx, "active-1", "wt-committed", snapshots.Usage{Size: 3})
			return err
		})
		require.NoError(t, err)
		inRead(t, ms, func(ctx context.Context) {
			mustGetInfo(t, ctx, "wt-active")
			_, info, usage := mustGetInfo(t, ctx, "wt-committed")
			assert.Equal(t, snapshots.KindCommitted, info.Kind)
			assert.Equal(t, int64(3), usage.Size)
		})
		_, _, _, err = storage.GetInfo(inside, "wt-active")
		assertSentinel(t, err, storage.ErrTransactionDone, failedPrecondition, "the callback's transaction after WithTransaction")
	})

	run(t, "rolls back and returns the callback's error", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		before := dump(t, ms)
		var inside context.Context
		err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			inside = ctx
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "wt-active", "committed-1"); err != nil {
				return err
			}
			if _, _, err := storage.Remove(ctx, "view-1"); err != nil {
				return err
			}
			if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "committed-2", Labels: map[string]string{"x": "y"}}); err != nil {
				return err
			}
			return fmt.Errorf("callback failed: %w", errBoom)
		})
		assert.ErrorIs(t, err, errBoom)
		assert.Equal(t, before, dump(t, ms))
		_, _, _, err = storage.GetInfo(inside, "active-1")
		assertSentinel(t, err, storage.ErrTransactionDone, failedPrecondition, "the callback's transaction after WithTransaction")
	})

	run(t, "returns a refusal with its class and rolls back", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		before := dump(t, ms)
		err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "wt-first", ""); err != nil {
				return err
			}
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "wt-orphan", "does-not-exist")
			return err
		})
		assert.True(t, errdefs.IsNotFound(err), "want NotFound, got %v", err)
		assert.Equal(t, before, dump(t, ms))
	})

	run(t, "read-only never commits and refuses writes with ErrReadOnly", func(t *testing.T) {
		ms, _ := openStore(t, open)
		f := populate(t, ms)
		before := dump(t, ms)
		calls := 0
		var inside context.Context
		err := ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			calls++
			inside = ctx
			id, _, _, err := storage.GetInfo(ctx, "active-1")
			if assert.NoError(t, err) {
				assert.Equal(t, f.ids["active-1"], id)
			}
			_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "wt-ro", "committed-1")
			assertSentinel(t, err, storage.ErrReadOnly, failedPrecondition, "CreateSnapshot in a read-only WithTransaction")
			_, err = storage.UpdateInfo(ctx, snapshots.Info{Name: "active-1", Labels: map[string]string{"x": "y"}})
			assertSentinel(t, err, storage.ErrReadOnly, failedPrecondition, "UpdateInfo in a read-only WithTransaction")
			_, _, err = storage.Remove(ctx, "view-1")
			assertSentinel(t, err, storage.ErrReadOnly, failedPrecondition, "Remove in a read-only WithTransaction")
			_, err = storage.CommitActive(ctx, "active-1", "wt-ro-committed", snapshots.Usage{})
			assertSentinel(t, err, storage.ErrReadOnly, failedPrecondition, "CommitActive in a read-only WithTransaction")
			return nil
		})
		assert.NoError(t, err)
		assert.Equal(t, 1, calls, "a read-only callback runs once")
		assert.Equal(t, before, dump(t, ms))
		_, _, _, err = storage.GetInfo(inside, "active-1")
		assertSentinel(t, err, storage.ErrTransactionDone, failedPrecondition, "the callback's transaction after WithTransaction")
	})

	run(t, "read-only returns the callback's error", func(t *testing.T) {
		ms, _ := openStore(t, open)
		populate(t, ms)
		err := ms.WithTransaction(context.Background(), false, func(context.Context) error {
			return fmt.Errorf("read failed: %w", errBoom)
		})
		assert.ErrorIs(t, err, errBoom)
	})
}
