package storage_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
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

// engines opens a fresh store of each engine for table-driven tests.
var engines = []struct {
	name string
	open func(t *testing.T) storage.MetaStore
}{
	{"bolt", func(t *testing.T) storage.MetaStore { return openBolt(t, t.TempDir()) }},
	{"etcd", func(t *testing.T) storage.MetaStore { return openEtcd(t, uniqueRoot(t)) }},
}

func TestImportKeepsIDsAndRaisesTheAllocator(t *testing.T) {
	when := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	recs := []storage.Record{
		{Name: "base", ID: "10", Kind: snapshots.KindCommitted, Created: when, Updated: when, Usage: snapshots.Usage{Size: 7, Inodes: 2}},
		{Name: "layer", ID: "300", Kind: snapshots.KindCommitted, Parent: "base", Labels: map[string]string{"a": "b"}, Created: when, Updated: when},
		{Name: "container", ID: "20", Kind: snapshots.KindActive, Parent: "layer", Created: when, Updated: when},
	}
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			ctx := context.Background()
			update(t, ms, func(ctx context.Context) error { return storage.Import(ctx, recs...) })

			require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				id, info, usage, err := storage.GetInfo(ctx, "base")
				require.NoError(t, err)
				assert.Equal(t, "10", id)
				assert.True(t, info.Created.Equal(when))
				assert.Equal(t, snapshots.Usage{Size: 7, Inodes: 2}, usage)
				s, err := storage.GetSnapshot(ctx, "container")
				require.NoError(t, err)
				assert.Equal(t, storage.Snapshot{Kind: snapshots.KindActive, ID: "20", ParentIDs: []string{"300", "10"}}, s)
				return nil
			}))
			var fresh storage.Snapshot
			update(t, ms, func(ctx context.Context) (err error) {
				fresh, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "new", "layer")
				return err
			})
			n, err := strconv.ParseUint(fresh.ID, 10, 64)
			require.NoError(t, err)
			assert.Greater(t, n, uint64(300), "new IDs are above every imported one")

			problems, err := storage.Check(ctx, ms)
			require.NoError(t, err)
			assert.Empty(t, problems)
		})
	}
}

// idState is what a refused operation must leave as it was: every
// snapshot's identity and labels, and the allocator's limit.
type idState struct {
	Snapshots map[string]string // name -> ID, kind, parent, labels
	Limit     uint64
}

// readIDState reads idState in the transaction ctx carries.
func readIDState(t *testing.T, ctx context.Context) idState {
	t.Helper()
	st := idState{Snapshots: map[string]string{}}
	require.NoError(t, storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
		id, _, _, err := storage.GetInfo(ctx, info.Name)
		st.Snapshots[info.Name] = fmt.Sprintf("id=%s kind=%s parent=%q labels=%v", id, info.Kind, info.Parent, info.Labels)
		return err
	}))
	var err error
	st.Limit, err = storage.IDLimit(ctx)
	require.NoError(t, err)
	return st
}

func viewIDState(t *testing.T, ms storage.MetaStore) idState {
	t.Helper()
	var st idState
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		st = readIDState(t, ctx)
		return nil
	}))
	return st
}

func createID(t *testing.T, ctx context.Context, name string) uint64 {
	t.Helper()
	s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "")
	require.NoError(t, err)
	id, err := strconv.ParseUint(s.ID, 10, 64)
	require.NoError(t, err)
	return id
}

// TestRefusedImportChangesNothing refuses a batch whose last record is bad
// after good ones, in a transaction the caller goes on with and commits: the
// good records must not be written, the allocator must not move, and a new
// snapshot must not get an ID the refused batch held.
func TestRefusedImportChangesNothing(t *testing.T) {
	ok := storage.Record{Name: "ok", ID: "100", Kind: snapshots.KindCommitted}
	okChild := storage.Record{Name: "ok-child", ID: "101", Kind: snapshots.KindActive, Parent: "ok"}
	for _, tc := range []struct {
		name  string
		recs  []storage.Record
		class func(error) bool
	}{
		{"name in the store", []storage.Record{ok, {Name: "base", ID: "102", Kind: snapshots.KindCommitted}}, errdefs.IsAlreadyExists},
		{"name twice in the batch", []storage.Record{ok, {Name: "ok", ID: "102", Kind: snapshots.KindCommitted}}, errdefs.IsAlreadyExists},
		{"ID twice in the batch", []storage.Record{ok, {Name: "other", ID: "100", Kind: snapshots.KindCommitted}}, errdefs.IsInvalidArgument},
		{"ID with a leading zero", []storage.Record{ok, {Name: "x", ID: "0102", Kind: snapshots.KindActive}}, errdefs.IsInvalidArgument},
		{"ID with a sign", []storage.Record{ok, {Name: "x", ID: "+102", Kind: snapshots.KindActive}}, errdefs.IsInvalidArgument},
		{"ID with a space", []storage.Record{ok, {Name: "x", ID: " 102", Kind: snapshots.KindActive}}, errdefs.IsInvalidArgument},
		{"ID not a number", []storage.Record{ok, {Name: "x", ID: "x1", Kind: snapshots.KindActive}}, errdefs.IsInvalidArgument},
		{"ID zero", []storage.Record{ok, {Name: "x", ID: "0", Kind: snapshots.KindActive}}, errdefs.IsInvalidArgument},
		{"ID past 2^64-1", []storage.Record{ok, {Name: "x", ID: "18446744073709551616", Kind: snapshots.KindActive}}, errdefs.IsInvalidArgument},
		{"missing parent", []storage.Record{ok, okChild, {Name: "x", ID: "102", Kind: snapshots.KindActive, Parent: "nope"}}, errdefs.IsNotFound},
		{"parent later in the batch", []storage.Record{{Name: "x", ID: "102", Kind: snapshots.KindActive, Parent: "ok"}, ok}, errdefs.IsNotFound},
		{"active parent in the store", []storage.Record{ok, {Name: "y", ID: "102", Kind: snapshots.KindActive, Parent: "active"}}, errdefs.IsInvalidArgument},
		{"active parent in the batch", []storage.Record{ok, okChild, {Name: "y", ID: "102", Kind: snapshots.KindActive, Parent: "ok-child"}}, errdefs.IsInvalidArgument},
		{"unknown kind", []storage.Record{ok, {Name: "x", ID: "102", Kind: 42}}, errdefs.IsInvalidArgument},
		{"empty name", []storage.Record{ok, {ID: "102", Kind: snapshots.KindActive}}, errdefs.IsInvalidArgument},
	} {
		for _, eng := range engines {
			t.Run(tc.name+"/"+eng.name, func(t *testing.T) {
				ms := eng.open(t)
				update(t, ms, func(ctx context.Context) error {
					return storage.Import(ctx,
						storage.Record{Name: "base", ID: "5", Kind: snapshots.KindCommitted},
						storage.Record{Name: "active", ID: "6", Kind: snapshots.KindActive})
				})
				before := viewIDState(t, ms)
				refuse := func(ctx context.Context) {
					err := storage.Import(ctx, tc.recs...)
					assert.True(t, tc.class(err), "got %v", err)
					assert.Equal(t, before, readIDState(t, ctx), "inside the transaction")
				}
				// A refusal changes nothing, so the caller may go on and
				// commit: by Commit, and by WithTransaction, which on bbolt
				// shares a group commit.
				ctx, tx, err := ms.TransactionContext(context.Background(), true)
				require.NoError(t, err)
				refuse(ctx)
				require.NoError(t, tx.Commit())
				assert.Equal(t, before, viewIDState(t, ms), "after Commit")
				update(t, ms, func(ctx context.Context) error {
					refuse(ctx)
					return nil
				})
				assert.Equal(t, before, viewIDState(t, ms), "after WithTransaction")

				var fresh uint64
				update(t, ms, func(ctx context.Context) error {
					fresh = createID(t, ctx, "new")
					return nil
				})
				assert.Greater(t, fresh, before.Limit, "a new ID is above the allocator's limit before the refusal")
				for _, rec := range tc.recs {
					assert.NotEqual(t, rec.ID, strconv.FormatUint(fresh, 10), "the refused batch's IDs were never the store's")
				}
				problems, err := storage.Check(context.Background(), ms)
				require.NoError(t, err)
				assert.Empty(t, problems)
			})
		}
	}
}

// TestImportAcceptsABatchThatRefersToItself checks what the refusals above
// must not catch: parents earlier in the batch, and IDs in any order.
func TestImportAcceptsABatchThatRefersToItself(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			ms := eng.open(t)
			update(t, ms, func(ctx context.Context) error {
				return storage.Import(ctx,
					storage.Record{Name: "base", ID: "9", Kind: snapshots.KindCommitted},
					storage.Record{Name: "mid", ID: "3", Kind: snapshots.KindCommitted, Parent: "base"},
					storage.Record{Name: "top", ID: "7", Kind: snapshots.KindActive, Parent: "mid"},
					storage.Record{Name: "side", ID: "18446744073709551614", Kind: snapshots.KindView, Parent: "base"})
			})
			require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				s, err := storage.GetSnapshot(ctx, "top")
				require.NoError(t, err)
				assert.Equal(t, []string{"3", "9"}, s.ParentIDs)
				limit, err := storage.IDLimit(ctx)
				require.NoError(t, err)
				assert.Equal(t, uint64(math.MaxUint64-1), limit)
				return nil
			}))
			problems, err := storage.Check(context.Background(), ms)
			require.NoError(t, err)
			assert.Empty(t, problems)
		})
	}
}

// TestRaisedFloorHoldsForTheRestOfTheTransaction creates snapshots in the
// transaction that raised the allocator, after the store has already taken
// IDs (on etcd: reserved a block): every ID handed out then, and after the
// commit, is above the raised floor.
func TestRaisedFloorHoldsForTheRestOfTheTransaction(t *testing.T) {
	const floor = 1000 // above the store's first etcd block (1..128) and the next one
	for _, raise := range []struct {
		name string
		fn   func(ctx context.Context) error
	}{
		{"RaiseIDs", func(ctx context.Context) error { return storage.RaiseIDs(ctx, floor) }},
		{"Import", func(ctx context.Context) error {
			return storage.Import(ctx, storage.Record{Name: "imported", ID: strconv.Itoa(floor), Kind: snapshots.KindCommitted})
		}},
	} {
		for _, eng := range engines {
			t.Run(raise.name+"/"+eng.name, func(t *testing.T) {
				ms := eng.open(t)
				var first uint64
				update(t, ms, func(ctx context.Context) error {
					first = createID(t, ctx, "first")
					return nil
				})
				require.Less(t, first, uint64(floor))

				var inTx []uint64
				update(t, ms, func(ctx context.Context) error {
					inTx = nil // WithTransaction may run this again
					if err := raise.fn(ctx); err != nil {
						return err
					}
					for i := range 3 {
						inTx = append(inTx, createID(t, ctx, fmt.Sprintf("in-tx-%d", i)))
					}
					limit, err := storage.IDLimit(ctx)
					require.NoError(t, err)
					assert.GreaterOrEqual(t, limit, slices.Max(inTx), "IDLimit covers the transaction's own IDs")
					return nil
				})
				var after []uint64
				for i := range 3 {
					update(t, ms, func(ctx context.Context) error {
						after = append(after, createID(t, ctx, fmt.Sprintf("after-%d", i)))
						return nil
					})
				}
				all := append(slices.Clone(inTx), after...)
				for _, id := range all {
					assert.Greater(t, id, uint64(floor), "IDs %v", all)
				}
				assert.True(t, slices.IsSorted(all), "IDs are handed out in order: %v", all)
				assert.Len(t, slices.Compact(slices.Clone(all)), len(all), "IDs are unique: %v", all)
				problems, err := storage.Check(context.Background(), ms)
				require.NoError(t, err)
				assert.Empty(t, problems)
			})
		}
	}
}

// TestIDsNeverWrap raises the allocator to the top of the ID space: the
// last IDs are handed out, then creates fail with ErrIDsExhausted and
// change nothing, in the raising transaction and after it.
func TestIDsNeverWrap(t *testing.T) {
	const top = math.MaxUint64
	for _, tc := range []struct {
		name string
		// raise runs in the first transaction; left IDs are handed out
		// after it, in that transaction (inTx) or in later ones.
		raise func(ctx context.Context) error
		left  uint64
		inTx  bool
	}{
		{"Import of 2^64-1", func(ctx context.Context) error {
			return storage.Import(ctx, storage.Record{Name: "imported", ID: "18446744073709551615", Kind: snapshots.KindCommitted})
		}, 0, false},
		{"RaiseIDs to 2^64-1", func(ctx context.Context) error { return storage.RaiseIDs(ctx, top) }, 0, false},
		{"RaiseIDs to 2^64-4", func(ctx context.Context) error { return storage.RaiseIDs(ctx, top-3) }, 3, false},
		{"RaiseIDs to 2^64-4, creates in the same transaction", func(ctx context.Context) error { return storage.RaiseIDs(ctx, top-3) }, 3, true},
		{"Import of 2^64-3, creates in the same transaction", func(ctx context.Context) error {
			return storage.Import(ctx, storage.Record{Name: "imported", ID: "18446744073709551613", Kind: snapshots.KindCommitted})
		}, 2, true},
	} {
		for _, eng := range engines {
			t.Run(tc.name+"/"+eng.name, func(t *testing.T) {
				ms := eng.open(t)
				ctx := context.Background()
				var got []uint64
				exhausted := func(ctx context.Context, name string) {
					t.Helper()
					before := readIDState(t, ctx)
					s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "")
					assert.True(t, errors.Is(err, storage.ErrIDsExhausted), "got %v, snapshot %+v", err, s)
					assert.True(t, errdefs.IsResourceExhausted(err), "got %v", err)
					assert.Equal(t, before, readIDState(t, ctx), "a refused create changes nothing")
				}
				create := func(ctx context.Context) {
					t.Helper()
					for len(got) < int(tc.left) {
						got = append(got, createID(t, ctx, fmt.Sprintf("s%d", len(got))))
					}
					exhausted(ctx, "one-too-many")
				}

				tctx, tx, err := ms.TransactionContext(ctx, true)
				require.NoError(t, err)
				require.NoError(t, tc.raise(tctx))
				if tc.inTx {
					create(tctx)
				}
				require.NoError(t, tx.Commit())
				if !tc.inTx {
					for len(got) < int(tc.left) {
						update(t, ms, func(ctx context.Context) error {
							got = append(got, createID(t, ctx, fmt.Sprintf("s%d", len(got))))
							return nil
						})
					}
				}
				require.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
					exhausted(ctx, "after")
					return nil
				}))

				var want []uint64
				for id := top - tc.left + 1; id != 0 && len(want) < int(tc.left); id++ {
					want = append(want, id)
				}
				assert.Equal(t, want, got, "the last IDs, in order, and no wrap to 0")
				require.NoError(t, ms.WithTransaction(ctx, false, func(ctx context.Context) error {
					limit, err := storage.IDLimit(ctx)
					assert.Equal(t, uint64(top), limit)
					return err
				}))
				problems, err := storage.Check(ctx, ms)
				require.NoError(t, err)
				assert.Empty(t, problems, "Check's allocator bound does not wrap either")
			})
		}
	}
}

func TestIDLimitCarriedByRaiseIDsKeepsRemovedIDsRetired(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			src, dst := eng.open(t), eng.open(t)
			var removed string
			update(t, src, func(ctx context.Context) error {
				for _, name := range []string{"a", "b", "c"} {
					if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, ""); err != nil {
						return err
					}
				}
				var err error
				removed, _, err = storage.Remove(ctx, "c")
				return err
			})
			var limit uint64
			require.NoError(t, src.WithTransaction(context.Background(), false, func(ctx context.Context) (err error) {
				limit, err = storage.IDLimit(ctx)
				return err
			}))
			gone, err := strconv.ParseUint(removed, 10, 64)
			require.NoError(t, err)
			assert.GreaterOrEqual(t, limit, gone, "the limit covers the removed ID")

			update(t, dst, func(ctx context.Context) error { return storage.RaiseIDs(ctx, limit) })
			var s storage.Snapshot
			update(t, dst, func(ctx context.Context) (err error) {
				s, err = storage.CreateSnapshot(ctx, snapshots.KindActive, "new", "")
				return err
			})
			id, err := strconv.ParseUint(s.ID, 10, 64)
			require.NoError(t, err)
			assert.Greater(t, id, limit)
		})
	}
}

// TestEtcdRaisedFloorHoldsForEveryClientOfTheRoot raises the allocator
// through one client of a root while others hold blocks of IDs reserved
// below the new floor, idle or in an open transaction: no client hands out an
// ID at or below the floor afterwards, and each pays at most one conflict.
func TestEtcdRaisedFloorHoldsForEveryClientOfTheRoot(t *testing.T) {
	const floor = 1000
	for _, raise := range []struct {
		name string
		fn   func(ctx context.Context) error
	}{
		{"RaiseIDs", func(ctx context.Context) error { return storage.RaiseIDs(ctx, floor) }},
		{"Import", func(ctx context.Context) error {
			return storage.Import(ctx, storage.Record{Name: "imported", ID: strconv.Itoa(floor), Kind: snapshots.KindCommitted})
		}},
	} {
		t.Run(raise.name, func(t *testing.T) {
			root := uniqueRoot(t)
			idle, busy, raiser := openEtcd(t, root), openEtcd(t, root), openEtcd(t, root)
			ctx := context.Background()
			// Each client reserves a block under the old floor.
			for i, ms := range []storage.MetaStore{idle, busy, raiser} {
				update(t, ms, func(ctx context.Context) error {
					require.Less(t, createID(t, ctx, fmt.Sprintf("before-%d", i)), uint64(floor))
					return nil
				})
			}
			// busy has a transaction open, with an ID of its old block.
			bctx, btx, err := busy.TransactionContext(ctx, true)
			require.NoError(t, err)
			require.Less(t, createID(t, bctx, "busy-open"), uint64(floor))

			update(t, raiser, raise.fn)

			err = btx.Commit()
			assert.True(t, errdefs.IsConflict(err), "a commit with an ID of a block below the new floor conflicts: got %v", err)

			for _, c := range []struct {
				name    string
				ms      storage.MetaStore
				maxRuns int // of its first create after the raise
			}{
				// The raiser knows its commit raised the floor.
				{"raiser", raiser, 1},
				// idle learns of the raise from one conflict.
				{"idle", idle, 2},
				// busy learnt of it from its failed commit.
				{"busy", busy, 1},
			} {
				var ids []uint64
				for i, maxRuns := range []int{c.maxRuns, 1} {
					runs := 0
					var id uint64 // the last run's is the one committed
					require.NoError(t, c.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
						runs++
						id = createID(t, ctx, fmt.Sprintf("%s-after-%d", c.name, i))
						return nil
					}))
					assert.LessOrEqual(t, runs, maxRuns, "%s: runs of create %d", c.name, i)
					ids = append(ids, id)
				}
				for _, id := range ids {
					assert.Greater(t, id, uint64(floor), "%s: IDs %v", c.name, ids)
				}
			}
			problems, err := storage.Check(ctx, raiser)
			require.NoError(t, err)
			assert.Empty(t, problems)
		})
	}
}

// TestEtcdOtherConflictsKeepTheIDBlock checks that only a raised floor makes
// a client drop its block of IDs: a conflict over a snapshot does not, and
// the client's next ID follows on from the same block.
func TestEtcdOtherConflictsKeepTheIDBlock(t *testing.T) {
	root := uniqueRoot(t)
	a, b := openEtcd(t, root), openEtcd(t, root)
	ctx := context.Background()
	var first uint64
	update(t, a, func(ctx context.Context) error {
		first = createID(t, ctx, "a-first")
		return nil
	})
	actx, atx, err := a.TransactionContext(ctx, true)
	require.NoError(t, err)
	lost := createID(t, actx, "contested")
	update(t, b, func(ctx context.Context) error {
		createID(t, ctx, "contested")
		return nil
	})
	err = atx.Commit()
	require.True(t, errdefs.IsConflict(err), "got %v", err)

	var next uint64
	update(t, a, func(ctx context.Context) error {
		next = createID(t, ctx, "a-next")
		return nil
	})
	assert.Equal(t, []uint64{first + 1, lost + 1}, []uint64{lost, next}, "IDs follow on in the same block")
}

// TestEtcdIDsStayUniqueWhileTheFloorRises runs clients creating snapshots
// while another raises the floor again and again: IDs stay unique, and every
// create begun after a raise returned gets an ID above that raise's floor.
func TestEtcdIDsStayUniqueWhileTheFloorRises(t *testing.T) {
	const clients, perClient, raises = 3, 60, 6
	root := uniqueRoot(t)
	ctx := context.Background()
	var floor atomic.Uint64 // the last floor whose raise has returned
	var mu sync.Mutex
	owner := map[uint64]string{}
	var wg sync.WaitGroup
	for c := range clients {
		ms := openEtcd(t, root)
		wg.Go(func() {
			for i := range perClient {
				name := fmt.Sprintf("c%d-%d", c, i)
				atLeast := floor.Load()
				var id uint64
				require.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
					s, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, "")
					if err == nil {
						id, err = strconv.ParseUint(s.ID, 10, 64)
					}
					return err
				}))
				assert.Greater(t, id, atLeast, "%s was created after the floor reached %d", name, atLeast)
				mu.Lock()
				prev, dup := owner[id]
				owner[id] = name
				mu.Unlock()
				assert.False(t, dup, "ID %d given to %s and %s", id, prev, name)
			}
		})
	}
	raiser := openEtcd(t, root)
	for range raises {
		var to uint64
		require.NoError(t, raiser.WithTransaction(ctx, true, func(ctx context.Context) error {
			limit, err := storage.IDLimit(ctx)
			to = limit + 1000
			if err != nil {
				return err
			}
			return storage.RaiseIDs(ctx, to)
		}))
		floor.Store(to)
		time.Sleep(5 * time.Millisecond)
	}
	wg.Wait()
	assert.Len(t, owner, clients*perClient)
	problems, err := storage.Check(ctx, raiser)
	require.NoError(t, err)
	assert.Empty(t, problems)
}
