package storage_test

// User-side checks of the promises of README.md and the exported doc
// comments, each named after the sentence it checks.

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	cstorage "github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
)

// promiseDump is every stored field of every snapshot but the times, and
// the allocator's limit: what a refusal must leave as it was.
func promiseDump(t *testing.T, ctx context.Context) string {
	t.Helper()
	var b strings.Builder
	require.NoError(t, storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
		id, _, usage, err := storage.GetInfo(ctx, info.Name)
		fmt.Fprintf(&b, "%q id=%s kind=%s parent=%q labels=%v usage=%+v\n", info.Name, id, info.Kind, info.Parent, info.Labels, usage)
		return err
	}))
	limit, err := storage.IDLimit(ctx)
	require.NoError(t, err)
	fmt.Fprintf(&b, "limit=%d\n", limit)
	return b.String()
}

func promiseViewDump(t *testing.T, ms storage.MetaStore) (d string) {
	t.Helper()
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		d = promiseDump(t, ctx)
		return nil
	}))
	return d
}

// "Every refusal wraps a github.com/containerd/errdefs class ... A refused
// operation changes nothing, and the transaction may go on."
func TestPromiseEveryRefusalHasItsClassAndChangesNothing(t *testing.T) {
	long := strings.Repeat("n", storage.MaxNameSize+1)
	exact := strings.Repeat("n", storage.MaxNameSize)
	bigLabel := map[string]string{"k": strings.Repeat("v", 4096)} // 4097 bytes with the key
	for _, tc := range []struct {
		name  string
		op    func(ctx context.Context) error
		class func(error) bool
	}{
		{"create existing name", func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "active", "")
			return err
		}, errdefs.IsAlreadyExists},
		{"create with missing parent", func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x", "nope")
			return err
		}, errdefs.IsNotFound},
		{"create on active parent", func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x", "active")
			return err
		}, errdefs.IsInvalidArgument},
		{"create of committed kind", func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindCommitted, "x", "")
			return err
		}, errdefs.IsInvalidArgument},
		{"create with empty name", func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "", "")
			return err
		}, errdefs.IsInvalidArgument},
		{"create with name over MaxNameSize", func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, long, "")
			return err
		}, errdefs.IsInvalidArgument},
		{"create with label over 4096 bytes", func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x", "", snapshots.WithLabels(bigLabel))
			return err
		}, errdefs.IsInvalidArgument},
		{"create with empty label key", func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x", "", snapshots.WithLabels(map[string]string{"": "v"}))
			return err
		}, errdefs.IsInvalidArgument},
		{"commit to a name over MaxNameSize", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "active", long, snapshots.Usage{})
			return err
		}, errdefs.IsInvalidArgument},
		{"commit to an existing name", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "active", "base", snapshots.Usage{})
			return err
		}, errdefs.IsAlreadyExists},
		{"commit of a view", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "view", "x", snapshots.Usage{})
			return err
		}, errdefs.IsFailedPrecondition},
		{"commit of a committed", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "base", "x", snapshots.Usage{})
			return err
		}, errdefs.IsFailedPrecondition},
		{"commit of a missing key", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "nope", "x", snapshots.Usage{})
			return err
		}, errdefs.IsNotFound},
		{"commit with a label over 4096 bytes", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "active", "x", snapshots.Usage{}, snapshots.WithLabels(bigLabel))
			return err
		}, errdefs.IsInvalidArgument},
		{"rebase on commit onto the active itself", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "free", "x", snapshots.Usage{}, snapshots.WithParent("free"))
			return err
		}, errdefs.IsFailedPrecondition},
		{"rebase on commit onto its own new name", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "free", "x", snapshots.Usage{}, snapshots.WithParent("x"))
			return err
		}, errdefs.IsNotFound},
		{"remove a parent", func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, "base")
			return err
		}, errdefs.IsFailedPrecondition},
		{"remove a missing name", func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, "nope")
			return err
		}, errdefs.IsNotFound},
		{"update a missing name", func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "nope", Labels: map[string]string{"a": "b"}})
			return err
		}, errdefs.IsNotFound},
		{"update with a label over 4096 bytes", func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: bigLabel})
			return err
		}, errdefs.IsInvalidArgument},
		{"update with a bad field path", func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"a": "b"}}, "parent")
			return err
		}, errdefs.IsInvalidArgument},
		{"get snapshot of a committed", func(ctx context.Context) error {
			_, err := storage.GetSnapshot(ctx, "base")
			return err
		}, errdefs.IsFailedPrecondition},
		{"walk with a bad filter", func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil }, "labels.a==")
		}, errdefs.IsInvalidArgument},
		{"import over an existing name", func(ctx context.Context) error {
			return storage.Import(ctx, storage.Record{Name: "ok", ID: "900", Kind: snapshots.KindCommitted},
				storage.Record{Name: "base", ID: "901", Kind: snapshots.KindCommitted})
		}, errdefs.IsAlreadyExists},
		{"import with a label over 4096 bytes", func(ctx context.Context) error {
			return storage.Import(ctx, storage.Record{Name: "ok", ID: "900", Kind: snapshots.KindCommitted},
				storage.Record{Name: "x", ID: "901", Kind: snapshots.KindCommitted, Labels: bigLabel})
		}, errdefs.IsInvalidArgument},
		{"import with a name over MaxNameSize", func(ctx context.Context) error {
			return storage.Import(ctx, storage.Record{Name: "ok", ID: "900", Kind: snapshots.KindCommitted},
				storage.Record{Name: long, ID: "901", Kind: snapshots.KindCommitted})
		}, errdefs.IsInvalidArgument},
	} {
		for _, eng := range engines {
			t.Run(tc.name+"/"+eng.name, func(t *testing.T) {
				ms := eng.open(t)
				update(t, ms, func(ctx context.Context) error {
					if err := commitLayer(ctx, "base", ""); err != nil {
						return err
					}
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "active", "base", snapshots.WithLabels(map[string]string{"l": "v"})); err != nil {
						return err
					}
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "free", ""); err != nil {
						return err
					}
					_, err := storage.CreateSnapshot(ctx, snapshots.KindView, "view", "base")
					return err
				})
				before := promiseViewDump(t, ms)
				ctx, tx, err := ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				err = tc.op(ctx)
				assert.True(t, tc.class(err), "class of %v", err)
				assert.Equal(t, before, promiseDump(t, ctx), "inside the transaction")
				// The transaction goes on: a write after the refusal commits.
				_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, exact, "base")
				require.NoError(t, err)
				require.NoError(t, tx.Commit())
				update(t, ms, func(ctx context.Context) error {
					_, _, err := storage.Remove(ctx, exact)
					return err
				})
				after := promiseViewDump(t, ms)
				// The allocator moved for the later create; nothing else did.
				cut := func(s string) string { return s[:strings.LastIndex(s, "limit=")] }
				assert.Equal(t, cut(before), cut(after))
				problems, err := storage.Check(context.Background(), ms)
				require.NoError(t, err)
				assert.Nil(t, problems)
			})
		}
	}
}

// "Misuse has its own documented sentinels": ErrNoTransaction, ErrReadOnly,
// ErrTransactionDone, ErrClosed, all FailedPrecondition.
func TestPromiseMisuseSentinels(t *testing.T) {
	ops := map[string]func(ctx context.Context) error{
		"CreateSnapshot": func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x", "")
			return err
		},
		"UpdateInfo": func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"a": "b"}})
			return err
		},
		"Remove": func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, "active")
			return err
		},
		"CommitActive": func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "active", "x", snapshots.Usage{})
			return err
		},
		"Import": func(ctx context.Context) error {
			return storage.Import(ctx, storage.Record{Name: "x", ID: "77", Kind: snapshots.KindCommitted})
		},
		"RaiseIDs": func(ctx context.Context) error { return storage.RaiseIDs(ctx, 1000) },
		// The transaction's state is reported before the arguments are
		// judged: these would be InvalidArgument in a writable one.
		"CreateSnapshot with an empty name": func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "", "")
			return err
		},
		"CommitShared with an empty content key": func(ctx context.Context) error {
			_, err := storage.CommitShared(ctx, "active", "x", "", snapshots.Usage{})
			return err
		},
		"BindLayer with an empty content key": func(ctx context.Context) error {
			_, err := storage.BindLayer(ctx, "x", "", "")
			return err
		},
		"TakeOver of an invalid host": func(ctx context.Context) error {
			_, err := storage.TakeOver(ctx, "no/such host", "active", "x", "")
			return err
		},
		"BindRemote without a ref label": func(ctx context.Context) error {
			_, err := storage.BindRemote(ctx, "x", "base")
			return err
		},
		"CommitRemote without a ref label": func(ctx context.Context) error {
			_, err := storage.CommitRemote(ctx, "active", "x", snapshots.Usage{})
			return err
		},
	}
	// Reads whose arguments would be refused: checked where the state
	// comes first (no transaction, an ended one).
	badReads := map[string]func(ctx context.Context) error{
		"WalkInfo with a bad filter": func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil }, "labels.a~=(")
		},
		"Walk with a bad filter": func(ctx context.Context) error {
			return storage.Walk(ctx, func(storage.Record) error { return nil }, "labels.a~=(")
		},
		"GetActiveSnapshot of an invalid host": func(ctx context.Context) error {
			_, err := storage.GetActiveSnapshot(ctx, "no/such host", "active")
			return err
		},
	}
	reads := map[string]func(ctx context.Context) error{
		"GetInfo": func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, "base")
			return err
		},
		"IDMap": func(ctx context.Context) error {
			_, err := storage.IDMap(ctx)
			return err
		},
		"IDLimit": func(ctx context.Context) error {
			_, err := storage.IDLimit(ctx)
			return err
		},
		"WalkInfo": func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
		},
		"GetSnapshot": func(ctx context.Context) error {
			_, err := storage.GetSnapshot(ctx, "active")
			return err
		},
	}
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			update(t, ms, func(ctx context.Context) error {
				if err := commitLayer(ctx, "base", ""); err != nil {
					return err
				}
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "active", "base")
				return err
			})
			before := promiseViewDump(t, ms)
			all := map[string]func(ctx context.Context) error{}
			for k, v := range ops {
				all[k] = v
			}
			for k, v := range reads {
				all[k] = v
			}
			for k, v := range badReads {
				all[k] = v
			}
			for name, op := range all {
				err := op(context.Background())
				assert.ErrorIs(t, err, storage.ErrNoTransaction, name)
				assert.True(t, errdefs.IsFailedPrecondition(err), "%s: %v", name, err)
			}
			// Read-only: every write, and Commit, is ErrReadOnly.
			ctx, tx, err := ms.TransactionContext(context.Background(), false)
			require.NoError(t, err)
			for name, op := range ops {
				err := op(ctx)
				assert.ErrorIs(t, err, storage.ErrReadOnly, name)
				assert.True(t, errdefs.IsFailedPrecondition(err), "%s: %v", name, err)
			}
			for name, op := range reads {
				assert.NoError(t, op(ctx), name)
			}
			err = tx.Commit()
			assert.ErrorIs(t, err, storage.ErrReadOnly)
			assert.NoError(t, tx.Rollback(), "a read-only transaction ends with Rollback")
			// Done: every method is ErrTransactionDone.
			ctx, tx, err = ms.TransactionContext(context.Background(), true)
			require.NoError(t, err)
			require.NoError(t, tx.Commit())
			for name, op := range all {
				err := op(ctx)
				assert.ErrorIs(t, err, storage.ErrTransactionDone, name)
				assert.True(t, errdefs.IsFailedPrecondition(err), "%s: %v", name, err)
			}
			var nilCtx context.Context
			_, _, _, err = tx.GetInfo(nilCtx, "base")
			assert.ErrorIs(t, err, storage.ErrTransactionDone, "GetInfo with a nil context")
			assert.ErrorIs(t, tx.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil }, "labels.a~=("),
				storage.ErrTransactionDone, "Transactor.WalkInfo with a bad filter")
			assert.ErrorIs(t, tx.Commit(), storage.ErrTransactionDone)
			assert.ErrorIs(t, tx.Rollback(), storage.ErrTransactionDone)
			assert.Equal(t, before, promiseViewDump(t, ms))
			// Closed: new transactions are ErrClosed; closing twice is safe.
			require.NoError(t, ms.Close())
			require.NoError(t, ms.Close())
			_, _, err = ms.TransactionContext(context.Background(), false)
			assert.ErrorIs(t, err, storage.ErrClosed)
			err = ms.WithTransaction(context.Background(), true, func(context.Context) error {
				t.Error("callback of a closed store ran")
				return nil
			})
			assert.ErrorIs(t, err, storage.ErrClosed)
			assert.True(t, errdefs.IsFailedPrecondition(err))
		})
	}
}

// "WalkInfo and IDMap on a store that has never been written return no
// snapshots"; "Check ... returns each problem found ... (none: nil)".
func TestPromiseNeverWrittenStoreIsEmptyAndClean(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				n := 0
				require.NoError(t, storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { n++; return nil }))
				assert.Zero(t, n)
				ids, err := storage.IDMap(ctx)
				require.NoError(t, err)
				assert.Empty(t, ids)
				limit, err := storage.IDLimit(ctx)
				require.NoError(t, err)
				assert.Zero(t, limit)
				return nil
			}))
			problems, err := storage.Check(context.Background(), ms)
			require.NoError(t, err)
			assert.Nil(t, problems)
		})
	}
}

// "Close ... waits at most CloseTimeout: if transactions are still in
// flight then, it returns ErrCloseTimeout (class Unavailable) and the engine
// stays open, so those transactions may still finish and commit; the store
// stays closed to new ones, and a later Close ... releases the engine".
func TestPromiseCloseWaitsAtMostCloseTimeout(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			storage.SetCloseTimeout(ms, 300*time.Millisecond)
			ctx, tx, err := ms.TransactionContext(context.Background(), true)
			require.NoError(t, err)
			start := time.Now()
			err = ms.Close()
			elapsed := time.Since(start)
			assert.ErrorIs(t, err, storage.ErrCloseTimeout)
			assert.True(t, errdefs.IsUnavailable(err), "class of %v", err)
			assert.GreaterOrEqual(t, elapsed, 300*time.Millisecond)
			assert.Less(t, elapsed, 5*time.Second)
			_, _, err = ms.TransactionContext(context.Background(), false)
			assert.ErrorIs(t, err, storage.ErrClosed, "closed to new transactions")
			// The one in flight goes on, and may nest a read-only one.
			_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "late", "")
			require.NoError(t, err)
			require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				_, err := storage.IDMap(ctx)
				return err
			}))
			require.NoError(t, tx.Commit())
			require.NoError(t, ms.Close())
			require.NoError(t, ms.Close())
		})
	}
}

// "2 writes per create, 2 per remove and 3 per commit of a snapshot with a
// parent (one fewer without), plus a deletion marker per kind of removal
// ... so 3 for a lone remove, 4 for a lone commit, and 64 creates, 63
// removes or 42 commits of children in one transaction"; past that the
// transaction "fails at Commit with ErrTooLarge (class ResourceExhausted)
// and applies nothing".
func TestPromiseEtcdWritesPerOperation(t *testing.T) {
	create := func(ctx context.Context, i int) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("new%03d", i), "base")
		return err
	}
	remove := func(ctx context.Context, i int) error {
		_, _, err := storage.Remove(ctx, fmt.Sprintf("a%03d", i))
		return err
	}
	commit := func(ctx context.Context, i int) error {
		_, err := storage.CommitActive(ctx, fmt.Sprintf("a%03d", i), fmt.Sprintf("c%03d", i), snapshots.Usage{})
		return err
	}
	for _, tc := range []struct {
		name   string
		maxOps int // 0: the server's default, and the store's
		n      int
		fits   bool
		op     func(ctx context.Context, i int) error
	}{
		{"64 creates of children", 0, 64, true, create},
		{"65 creates of children", 0, 65, false, create},
		{"63 removes of children", 0, 63, true, remove},
		{"64 removes of children", 0, 64, false, remove},
		{"42 commits of children", 0, 42, true, commit},
		{"43 commits of children", 0, 43, false, commit},
		{"a remove in 3", 3, 1, true, remove},
		{"a remove in 2", 2, 1, false, remove},
		{"a commit in 4", 4, 1, true, commit},
		{"a commit in 3", 3, 1, false, commit},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := uniqueRoot(t)
			ms := openEtcd(t, root)
			update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
			for j := 0; j < 70; j += 10 {
				update(t, ms, func(ctx context.Context) error {
					for i := j; i < j+10; i++ {
						if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("a%03d", i), "base"); err != nil {
							return err
						}
					}
					return nil
				})
			}
			before := promiseViewDump(t, ms)
			tms := ms
			if tc.maxOps != 0 {
				tms = openEtcd(t, root, storage.WithMaxTxnOps(tc.maxOps))
			}
			err := tms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
				for i := range tc.n {
					if err := tc.op(ctx, i); err != nil {
						return err
					}
				}
				return nil
			})
			if tc.fits {
				require.NoError(t, err)
				return
			}
			assert.ErrorIs(t, err, storage.ErrTooLarge)
			assert.True(t, errdefs.IsResourceExhausted(err), "class of %v", err)
			cut := func(s string) string { return s[:strings.LastIndex(s, "limit=")] }
			assert.Equal(t, cut(before), cut(promiseViewDump(t, ms)), "applies nothing")
		})
	}
}

// "WithTransaction and TransactionContext refuse it, with ErrNestedWrite
// (class FailedPrecondition), when their context carries an open
// transaction of the same store": also when a transaction of another store,
// or a nested read-only one of this store that has ended since, was added
// to the context after it. Before the fix both of these waited forever.
func TestPromiseBoltNestedWriteSeenThroughOtherTransactions(t *testing.T) {
	bg := context.Background()
	for _, tc := range []struct {
		name string
		// wrap returns a context derived from ctx1, which carries the
		// open writable transaction of a, and a cleanup.
		wrap func(t *testing.T, a storage.MetaStore, ctx1 context.Context) (context.Context, func())
	}{
		{"a nested read-only transaction that has ended", func(t *testing.T, a storage.MetaStore, ctx1 context.Context) (context.Context, func()) {
			ctx2, tx2, err := a.TransactionContext(ctx1, false)
			require.NoError(t, err)
			require.NoError(t, tx2.Rollback())
			return ctx2, func() {}
		}},
		{"an open transaction of another store", func(t *testing.T, _ storage.MetaStore, ctx1 context.Context) (context.Context, func()) {
			b := openBolt(t, t.TempDir())
			ctx2, tx2, err := b.TransactionContext(ctx1, true)
			require.NoError(t, err)
			return ctx2, func() { _ = tx2.Rollback() }
		}},
		{"a callback of another store", func(t *testing.T, _ storage.MetaStore, ctx1 context.Context) (context.Context, func()) {
			b := openBolt(t, t.TempDir())
			ctxc := make(chan context.Context)
			release := make(chan struct{})
			go func() {
				_ = b.WithTransaction(ctx1, false, func(ctx context.Context) error {
					ctxc <- ctx
					<-release
					return nil
				})
			}()
			return <-ctxc, func() { close(release) }
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := openBolt(t, t.TempDir())
			ctx1, tx1, err := a.TransactionContext(bg, true)
			require.NoError(t, err)
			ctx2, cleanup := tc.wrap(t, a, ctx1)
			for _, inner := range []struct {
				name string
				run  func() error
			}{
				{"TransactionContext", func() error {
					_, tx, err := a.TransactionContext(ctx2, true)
					if err == nil {
						_ = tx.Rollback()
					}
					return err
				}},
				{"WithTransaction", func() error {
					return a.WithTransaction(ctx2, true, func(context.Context) error { return nil })
				}},
			} {
				done := make(chan error, 1)
				go func() { done <- inner.run() }()
				select {
				case err := <-done:
					assert.ErrorIs(t, err, storage.ErrNestedWrite, inner.name)
					assert.True(t, errdefs.IsFailedPrecondition(err), "%s: class of %v", inner.name, err)
				case <-time.After(hangBound):
					t.Errorf("%s: still waiting after %v (hung on its own outer transaction)", inner.name, hangBound)
					_ = tx1.Rollback() // lets the hung one go on
					<-done
				}
			}
			cleanup()
			// The outer transaction goes on.
			_, err = storage.CreateSnapshot(ctx1, snapshots.KindActive, "outer", "")
			require.NoError(t, err)
			require.NoError(t, tx1.Commit())
			ids, err := idMap(a)
			require.NoError(t, err)
			assert.Len(t, ids, 1)
		})
	}
}

// "A WalkInfo callback may write in the walking transaction: the walk
// reports each snapshot as the transaction holds it when the walk reaches
// its name (one created ahead of the walk is visited, one removed ahead of
// it is not, one created behind it is not)", and one updated ahead is seen
// as written; a commit moves a snapshot from its key to its name.
func TestPromiseWalkWhoseCallbackWrites(t *testing.T) {
	opens := append([]struct {
		name string
		open func(t *testing.T) storage.MetaStore
	}{}, engines...)
	opens = append(opens, struct {
		name string
		open func(t *testing.T) storage.MetaStore
	}{"etcd-page1", func(t *testing.T) storage.MetaStore { return openEtcd(t, uniqueRoot(t), storage.WithPageSize(1)) }})
	for _, eng := range opens {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			update(t, ms, func(ctx context.Context) error {
				if err := commitLayer(ctx, "b-base", ""); err != nil {
					return err
				}
				for _, n := range []string{"d-active", "f-doomed", "h-relabel", "j-commit"} {
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, n, "b-base"); err != nil {
						return err
					}
				}
				return nil
			})
			var seen []string
			update(t, ms, func(ctx context.Context) error {
				return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
					seen = append(seen, fmt.Sprintf("%s:%s:%v", info.Name, info.Kind, info.Labels))
					if info.Name != "d-active" {
						return nil
					}
					for _, n := range []string{"a-behind", "e-ahead", "k-ahead"} {
						if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, n, "b-base"); err != nil {
							return err
						}
					}
					if _, _, err := storage.Remove(ctx, "f-doomed"); err != nil {
						return err
					}
					if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "h-relabel", Labels: map[string]string{"x": "y"}}); err != nil {
						return err
					}
					// From ahead to behind: visited neither under its key nor its name.
					if _, err := storage.CommitActive(ctx, "j-commit", "c-committed", snapshots.Usage{}); err != nil {
						return err
					}
					// From ahead to further ahead: visited under its name.
					_, err := storage.CommitActive(ctx, "e-ahead", "z-committed", snapshots.Usage{})
					return err
				})
			})
			assert.Equal(t, []string{
				"b-base:Committed:map[]",
				"d-active:Active:map[]",
				"h-relabel:Active:map[x:y]",
				"k-ahead:Active:map[]",
				"z-committed:Committed:map[]",
			}, seen)
			problems, err := storage.Check(context.Background(), ms)
			require.NoError(t, err)
			assert.Nil(t, problems)
		})
	}
}

// "a walk whose callback commits or rolls back its own transaction: the
// walk stops with ErrTransactionDone".
func TestPromiseWalkWhoseCallbackEndsItsTransaction(t *testing.T) {
	for _, eng := range engines {
		for _, end := range []string{"Commit", "Rollback"} {
			t.Run(eng.name+"/"+end, func(t *testing.T) {
				ms := eng.open(t)
				update(t, ms, func(ctx context.Context) error {
					for _, n := range []string{"a", "b", "c"} {
						if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, n, ""); err != nil {
							return err
						}
					}
					return nil
				})
				ctx, tx, err := ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				visits := 0
				err = storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
					visits++
					if end == "Commit" {
						return tx.Commit()
					}
					return tx.Rollback()
				})
				assert.ErrorIs(t, err, storage.ErrTransactionDone)
				assert.Equal(t, 1, visits)
			})
		}
	}
}

// "A name longer than the engine holds (bbolt: 32 KiB; etcd: 64 KiB ...)
// is absent without a request": NotFound from every lookup.
func TestPromiseNamesLongerThanTheEngineHoldsAreAbsent(t *testing.T) {
	for _, tc := range []struct {
		eng  string
		size int
	}{{"bolt", 32*1024 + 1}, {"etcd", 64*1024 + 1}, {"bolt", 1 << 20}, {"etcd", 1 << 20}} {
		t.Run(fmt.Sprintf("%s/%d", tc.eng, tc.size), func(t *testing.T) {
			var ms storage.MetaStore
			if tc.eng == "bolt" {
				ms = openBolt(t, t.TempDir())
			} else {
				ms = openEtcd(t, uniqueRoot(t))
			}
			update(t, ms, func(ctx context.Context) error {
				if err := commitLayer(ctx, "base", ""); err != nil {
					return err
				}
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "active", "base")
				return err
			})
			huge := strings.Repeat("h", tc.size)
			before := promiseViewDump(t, ms)
			for _, op := range []struct {
				name string
				run  func(ctx context.Context) error
			}{
				{"GetInfo", func(ctx context.Context) error { _, _, _, err := storage.GetInfo(ctx, huge); return err }},
				{"GetSnapshot", func(ctx context.Context) error { _, err := storage.GetSnapshot(ctx, huge); return err }},
				{"UpdateInfo", func(ctx context.Context) error {
					_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: huge, Labels: map[string]string{"a": "b"}})
					return err
				}},
				{"Remove", func(ctx context.Context) error { _, _, err := storage.Remove(ctx, huge); return err }},
				{"CommitActive key", func(ctx context.Context) error {
					_, err := storage.CommitActive(ctx, huge, "x", snapshots.Usage{})
					return err
				}},
				{"CreateSnapshot parent", func(ctx context.Context) error {
					_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x", huge)
					return err
				}},
			} {
				ctx, tx, err := ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				err = op.run(ctx)
				assert.True(t, errdefs.IsNotFound(err), "%s: %v", op.name, err)
				require.NoError(t, tx.Commit(), op.name)
			}
			assert.Equal(t, before, promiseViewDump(t, ms))
		})
	}
}

// "creating children of a parent does not conflict with relabelling it,
// with creating, committing or removing siblings, or with any read-only
// transaction; ... removing a parent against creating its child, two
// creates of one name, two commits to one name ... do".
func TestPromiseEtcdConflictsOnlyWhereTheAnswerCouldDiffer(t *testing.T) {
	create := func(name, parent string) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, parent)
			return err
		}
	}
	for _, tc := range []struct {
		name     string
		first    func(ctx context.Context) error // commits first
		second   func(ctx context.Context) error // began before first committed
		conflict bool
	}{
		{"relabel parent vs create child", func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "p", Labels: map[string]string{"x": "1"}})
			return err
		}, create("c1", "p"), false},
		{"create sibling vs create child", create("c2", "p"), create("c1", "p"), false},
		{"commit sibling vs create child", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "s1", "s1c", snapshots.Usage{})
			return err
		}, create("c1", "p"), false},
		{"remove sibling vs create child", func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, "s1")
			return err
		}, create("c1", "p"), false},
		{"read-only walk vs create child", func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
		}, create("c1", "p"), false},
		{"create child vs read-only GetInfo", create("c1", "p"), func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, "p")
			return err
		}, false},
		{"remove parent vs create child", func(ctx context.Context) error {
			for _, n := range []string{"s1", "s2", "p"} {
				if _, _, err := storage.Remove(ctx, n); err != nil {
					return err
				}
			}
			return nil
		}, create("c1", "p"), true},
		{"update one snapshot vs update another", func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "s1", Labels: map[string]string{"x": "1"}})
			return err
		}, func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "s2", Labels: map[string]string{"x": "2"}})
			return err
		}, false},
		{"create one name twice", create("c1", "p"), create("c1", "p"), true},
		{"commit to one name twice", func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "s1", "same", snapshots.Usage{})
			return err
		}, func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "s2", "same", snapshots.Usage{})
			return err
		}, true},
		{"create vs walk that sees it", create("c1", "p"), func(ctx context.Context) error {
			if err := storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil }); err != nil {
				return err
			}
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "s2", Labels: map[string]string{"n": "1"}})
			return err
		}, true},
		{"relabel vs GetInfo then write", func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "p", Labels: map[string]string{"x": "1"}})
			return err
		}, func(ctx context.Context) error {
			if _, _, _, err := storage.GetInfo(ctx, "p"); err != nil {
				return err
			}
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "s2", Labels: map[string]string{"n": "1"}})
			return err
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := uniqueRoot(t)
			a, b := openEtcd(t, root), openEtcd(t, root)
			update(t, a, func(ctx context.Context) error {
				if err := commitLayer(ctx, "p", ""); err != nil {
					return err
				}
				if err := create("s1", "p")(ctx); err != nil {
					return err
				}
				return create("s2", "p")(ctx)
			})
			// Each store reserves its ID block before the race.
			for _, ms := range []storage.MetaStore{a, b} {
				update(t, ms, func(ctx context.Context) error {
					if err := create("warm", "")(ctx); err != nil {
						return err
					}
					_, _, err := storage.Remove(ctx, "warm")
					return err
				})
			}
			ctxB, txB, err := b.TransactionContext(context.Background(), true)
			require.NoError(t, err)
			require.NoError(t, tc.second(ctxB))
			ctxA, txA, err := a.TransactionContext(context.Background(), true)
			require.NoError(t, err)
			require.NoError(t, tc.first(ctxA))
			require.NoError(t, txA.Commit())
			before := promiseViewDump(t, a)
			err = txB.Commit()
			if !tc.conflict {
				require.NoError(t, err)
				return
			}
			assert.True(t, errdefs.IsConflict(err), "got %v", err)
			assert.Equal(t, before, promiseViewDump(t, a), "a lost commit applies nothing")
		})
	}
}

// "Check ... The error is for ... a MetaStore not made by this package
// (class NotImplemented)."
func TestPromiseCheckRefusesAForeignMetaStore(t *testing.T) {
	_, err := storage.Check(context.Background(), foreignStore{})
	assert.True(t, errdefs.IsNotImplemented(err), "got %v", err)
}

// foreignStore is a MetaStore of another package: its transactions are
// not this package's.
type foreignStore struct{ storage.MetaStore }

func (foreignStore) TransactionContext(ctx context.Context, _ bool) (context.Context, storage.Transactor, error) {
	return storage.ContextWithTransactor(ctx, foreignTx{}), foreignTx{}, nil
}

type foreignTx struct{ storage.Transactor }

func (foreignTx) Rollback() error { return nil }

// "if another process holds its lock, the constructor fails after
// DefaultBoltTimeout (... or the Options.Timeout a BoltOpt sets) with
// ErrLocked (class Unavailable)"; "A bbolt file stays open, and locked,
// until a Close returns nil."
func TestPromiseBoltFileLockedUntilCloseReturnsNil(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "metadata.db")
	ms, err := storage.NewBoltMetaStore(path)
	require.NoError(t, err)
	storage.SetCloseTimeout(ms, 100*time.Millisecond)
	short := func(o *bolt.Options) error { o.Timeout = 100 * time.Millisecond; return nil }
	ctx, tx, err := ms.TransactionContext(context.Background(), true)
	require.NoError(t, err)
	assert.ErrorIs(t, ms.Close(), storage.ErrCloseTimeout)
	other, err := storage.NewBoltMetaStore(path, short)
	assert.Nil(t, other)
	assert.ErrorIs(t, err, storage.ErrLocked)
	assert.True(t, errdefs.IsUnavailable(err), "class of %v", err)
	_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "late", "")
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	require.NoError(t, ms.Close())
	other, err = storage.NewBoltMetaStore(path, short)
	require.NoError(t, err)
	ids, err := idMap(other)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"1": "late"}, ids)
	require.NoError(t, other.Close())
}

// "labels of one snapshot, on etcd: the record must fit in etcd's request
// size (--max-request-bytes, 1.5 MiB by default) | ResourceExhausted
// (ErrTooLarge) at Commit"; "one label: key not empty, key + value at most
// 4096 bytes".
func TestPromiseLabelBounds(t *testing.T) {
	edge := map[string]string{"k": strings.Repeat("v", 4095)}
	for _, eng := range engines {
		t.Run(eng.name+"/4096 bytes fit", func(t *testing.T) {
			ms := eng.open(t)
			update(t, ms, func(ctx context.Context) error {
				if err := commitLayer(ctx, "base", ""); err != nil {
					return err
				}
				if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a", "base", snapshots.WithLabels(edge)); err != nil {
					return err
				}
				if _, err := storage.CommitActive(ctx, "a", "c", snapshots.Usage{}, snapshots.WithLabels(edge)); err != nil {
					return err
				}
				if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: edge}); err != nil {
					return err
				}
				return storage.Import(ctx, storage.Record{Name: "imp", ID: "500", Kind: snapshots.KindCommitted, Labels: edge})
			})
		})
	}
	t.Run("etcd/record over the request size", func(t *testing.T) {
		ms := openEtcd(t, uniqueRoot(t))
		update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
		before := promiseViewDump(t, ms)
		many := map[string]string{}
		for i := range 400 {
			many[fmt.Sprintf("k%03d", i)] = strings.Repeat("v", 4000)
		}
		err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: many})
			return err
		})
		assert.ErrorIs(t, err, storage.ErrTooLarge)
		assert.True(t, errdefs.IsResourceExhausted(err), "class of %v", err)
		assert.Equal(t, before, promiseViewDump(t, ms), "applies nothing")
	})
}

// "A canceled context ends a call with the context's error"; "a
// transaction that failed or was rolled back left no trace".
func TestPromiseCanceledContextCommitsNothing(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			// The ID block an etcd client reserved stays reserved (IDs are
			// never reused): the allocator's limit may rise.
			cut := func(s string) string { return s[:strings.LastIndex(s, "limit=")] }
			before := cut(promiseViewDump(t, ms))
			cctx, cancel := context.WithCancel(context.Background())
			ctx, tx, err := ms.TransactionContext(cctx, true)
			require.NoError(t, err)
			_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "a", "")
			require.NoError(t, err)
			cancel()
			_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "b", "")
			assert.ErrorIs(t, err, context.Canceled)
			assert.Error(t, tx.Commit(), "a canceled transaction commits nothing")
			_ = tx.Rollback()
			assert.Equal(t, before, cut(promiseViewDump(t, ms)))

			cctx, cancel = context.WithCancel(context.Background())
			err = ms.WithTransaction(cctx, true, func(ctx context.Context) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a", "")
				cancel()
				return err
			})
			assert.ErrorIs(t, err, context.Canceled)
			assert.Equal(t, before, cut(promiseViewDump(t, ms)))
		})
	}
}

// "etcd has no such lock and allows nesting."
func TestPromiseEtcdAllowsNestedWritableTransactions(t *testing.T) {
	ms := openEtcd(t, uniqueRoot(t))
	update(t, ms, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "outer", ""); err != nil {
			return err
		}
		return ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "inner", "")
			return err
		})
	})
	ids, err := idMap(ms)
	require.NoError(t, err)
	assert.Len(t, ids, 2)
}

// Problem.Page: "String begins with "page damage: "".
func TestPromiseProblemStringOfPageDamage(t *testing.T) {
	assert.True(t, strings.HasPrefix(storage.Problem{Page: true, Detail: "page 7 freed twice"}.String(), "page damage: "))
	assert.Contains(t, storage.Problem{Snapshot: "s", Detail: "parent missing"}.String(), "s")
}

// "IDs never wrap"; on etcd "the allocator hands out IDs from the floor
// plus 128 for every block reserved on the root so far (before the raise as
// after) ... a raise to within 128 × blocks of the top leaves no IDs": no
// client commits an ID at or below the raised floor, none wraps, and every
// client is refused with ErrIDsExhausted once the allocator's limit is
// 2^64-1.
func TestPromiseEtcdRaiseNearTheTopAfterBlocksWereReserved(t *testing.T) {
	const top = uint64(1<<64 - 1)
	root := uniqueRoot(t)
	var stores []storage.MetaStore
	for i := range 4 {
		ms := openEtcd(t, root)
		stores = append(stores, ms)
		update(t, ms, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("s%d", i), "")
			return err
		})
	}
	update(t, stores[0], func(ctx context.Context) error { return storage.RaiseIDs(ctx, top-300) })
	before := promiseViewDump(t, stores[0])
	assert.True(t, strings.HasSuffix(before, fmt.Sprintf("limit=%d\n", top)), before)
	for i, ms := range stores {
		err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("t%d", i), "")
			return err
		})
		assert.ErrorIs(t, err, storage.ErrIDsExhausted, "client %d", i)
		assert.True(t, errdefs.IsResourceExhausted(err), "client %d: class of %v", i, err)
	}
	assert.Equal(t, before, promiseViewDump(t, stores[0]), "nothing committed")
	problems, err := storage.Check(context.Background(), stores[0])
	require.NoError(t, err)
	assert.Nil(t, problems)
}

// "No labels read back as a nil map ... we read such a file as nil and
// never write the empty bucket."
func TestPromiseNoLabelsReadBackAsNil(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			update(t, ms, func(ctx context.Context) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a", "", snapshots.WithLabels(map[string]string{"k": "v"}))
				return err
			})
			update(t, ms, func(ctx context.Context) error {
				_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "a", Labels: map[string]string{}}, "labels.k")
				return err
			})
			require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				_, info, _, err := storage.GetInfo(ctx, "a")
				assert.Nil(t, info.Labels)
				return err
			}))
		})
	}
}

// "Import does not look for a snapshot of the store with an imported ID
// (Check does)": Check reports the shared ID by snapshot.
func TestPromiseCheckReportsAnImportedIDTheStoreAlreadyHad(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			var id string
			update(t, ms, func(ctx context.Context) error {
				s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "mine", "")
				id = s.ID
				return err
			})
			update(t, ms, func(ctx context.Context) error {
				return storage.Import(ctx, storage.Record{Name: "theirs", ID: id, Kind: snapshots.KindCommitted})
			})
			problems, err := storage.Check(context.Background(), ms)
			require.NoError(t, err)
			require.NotEmpty(t, problems)
			var names []string
			for _, p := range problems {
				assert.False(t, p.Page)
				names = append(names, p.Snapshot)
			}
			assert.Subset(t, append(names, ""), []string{"mine"}, "%v", problems)
			assert.Contains(t, fmt.Sprint(problems), "theirs")
		})
	}
}

// "A callback that fails (returns an error, panics, or ends its goroutine
// with runtime.Goexit ...) has its writes undone before the next one runs,
// so it affects nobody else, and the panic or Goexit then goes on in its
// caller"; Close waits for WithTransaction calls in flight.
func TestPromiseBoltGroupMemberThatExitsAffectsNobody(t *testing.T) {
	ms := openBolt(t, t.TempDir())
	const writers = 8
	errs := make(chan error, writers)
	exited := make(chan bool, 1)
	start := make(chan struct{})
	for i := range writers {
		go func() {
			<-start
			errs <- ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
				_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("w%d", i), "")
				return err
			})
		}()
	}
	go func() {
		returned := false
		defer func() { exited <- !returned }()
		<-start
		_ = ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "goexit", ""); err != nil {
				return err
			}
			runtime.Goexit()
			return nil
		})
		returned = true
	}()
	close(start)
	within(t, hangBound, "group with a member that exits", func() {
		for range writers {
			assert.NoError(t, <-errs)
		}
		assert.True(t, <-exited, "the Goexit went on in its caller")
	})
	ids, err := idMap(ms)
	require.NoError(t, err)
	assert.Len(t, ids, writers)
	for _, name := range ids {
		assert.NotEqual(t, "goexit", name)
	}
	within(t, hangBound, "Close", func() { assert.NoError(t, ms.Close()) })
}

// "existing snapshot name ... what the engine holds: bbolt's key limit (32
// KiB), so longer names containerd's store wrote stay reachable": at the
// limit itself, a name containerd wrote is read, updated, used as a parent,
// committed and removed.
func TestPromiseContainerdNamesAtBoltsKeyLimitAreReachable(t *testing.T) {
	dbfile := filepath.Join(t.TempDir(), "metadata.db")
	cms, err := cstorage.NewMetaStore(dbfile)
	require.NoError(t, err)
	layer := strings.Repeat("L", 32768)
	work := strings.Repeat("W", 32768)
	ctx, tx, err := cms.TransactionContext(context.Background(), true)
	require.NoError(t, err)
	_, err = cstorage.CreateSnapshot(ctx, snapshots.KindActive, "tmp", "")
	require.NoError(t, err)
	_, err = cstorage.CommitActive(ctx, "tmp", layer, snapshots.Usage{})
	require.NoError(t, err)
	_, err = cstorage.CreateSnapshot(ctx, snapshots.KindActive, work, layer)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	require.NoError(t, cms.Close())

	ms, err := storage.NewBoltMetaStore(dbfile)
	require.NoError(t, err)
	defer func() { require.NoError(t, ms.Close()) }()
	problems, err := storage.Check(context.Background(), ms)
	require.NoError(t, err)
	assert.Nil(t, problems)
	update(t, ms, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, layer)
		require.NoError(t, err)
		s, err := storage.GetSnapshot(ctx, work)
		require.NoError(t, err)
		assert.Equal(t, []string{"1"}, s.ParentIDs)
		_, err = storage.UpdateInfo(ctx, snapshots.Info{Name: work, Labels: map[string]string{"a": "b"}})
		require.NoError(t, err)
		_, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "child", layer)
		require.NoError(t, err)
		_, err = storage.CommitActive(ctx, work, "done", snapshots.Usage{})
		require.NoError(t, err)
		_, _, err = storage.Remove(ctx, "done")
		require.NoError(t, err)
		_, _, err = storage.Remove(ctx, "child")
		require.NoError(t, err)
		_, _, err = storage.Remove(ctx, layer)
		require.NoError(t, err)
		return nil
	})
}

// Transactor.CreateSnapshot: "a new ID, one that no committed snapshot has
// held, even one removed since. On bbolt, as in containerd's store, the ID
// of a create that was rolled back (or whose callback failed) is handed out
// again; etcd, and bbolt WithParallelCallbacks, skip it."
func TestPromiseIDsOfRolledBackCreates(t *testing.T) {
	for _, tc := range []struct {
		name  string
		open  func(t *testing.T) storage.MetaStore
		again bool // a rolled-back ID is handed out again
	}{
		{"bolt", func(t *testing.T) storage.MetaStore { return openBolt(t, t.TempDir()) }, !storage.ParallelByDefault()},
		{"bolt parallel", func(t *testing.T) storage.MetaStore {
			return openBolt(t, t.TempDir(), storage.WithParallelCallbacks())
		}, false},
		{"etcd", func(t *testing.T) storage.MetaStore { return openEtcd(t, uniqueRoot(t)) }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms := tc.open(t)
			create := func(ctx context.Context) (string, error) {
				s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "k", "")
				return s.ID, err
			}
			var ids []string
			// Rolled back by TransactionContext's Rollback.
			ctx, tx, err := ms.TransactionContext(context.Background(), true)
			require.NoError(t, err)
			id, err := create(ctx)
			require.NoError(t, err)
			ids = append(ids, id)
			require.NoError(t, tx.Rollback())
			// Undone by a failing callback.
			errUndo := errors.New("undo")
			require.ErrorIs(t, ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
				id, err := create(ctx)
				require.NoError(t, err)
				ids = append(ids, id)
				return errUndo
			}), errUndo)
			// Committed, then removed: its ID is never handed out again.
			update(t, ms, func(ctx context.Context) error {
				id, err := create(ctx)
				ids = append(ids, id)
				return err
			})
			update(t, ms, func(ctx context.Context) error {
				_, _, err := storage.Remove(ctx, "k")
				return err
			})
			update(t, ms, func(ctx context.Context) error {
				id, err := create(ctx)
				ids = append(ids, id)
				return err
			})
			if tc.again {
				assert.Equal(t, ids[0], ids[1], "a rolled-back ID is handed out again: %v", ids)
				assert.Equal(t, ids[0], ids[2], "a rolled-back ID is handed out again: %v", ids)
			} else {
				distinct := map[string]bool{ids[0]: true, ids[1]: true, ids[2]: true}
				assert.Len(t, distinct, 3, "rolled-back IDs are skipped: %v", ids)
			}
			assert.NotContains(t, ids[:3], ids[3], "no ID handed out before is handed out after a removal: %v", ids)
		})
	}
}
