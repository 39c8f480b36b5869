package storage_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// lcEngines opens a store on each engine, and again at the same place once
// the first is closed.
var lcEngines = []struct {
	name string
	open func(t *testing.T) (ms storage.MetaStore, reopen func() storage.MetaStore)
}{
	{"bolt", func(t *testing.T) (storage.MetaStore, func() storage.MetaStore) {
		dir := t.TempDir()
		return openBolt(t, dir), func() storage.MetaStore { return openBolt(t, dir) }
	}},
	{"etcd", func(t *testing.T) (storage.MetaStore, func() storage.MetaStore) {
		root := uniqueRoot(t)
		return openEtcd(t, root), func() storage.MetaStore { return openEtcd(t, root) }
	}},
}

// lcFlights are the ways a transaction is in flight: run begins one, calls
// hold with its context, then (if writable) creates "in-flight" and ends it.
var lcFlights = []struct {
	name     string
	writable bool
	run      func(ms storage.MetaStore, hold func(ctx context.Context)) error
}{
	{"writable callback", true, func(ms storage.MetaStore, hold func(context.Context)) error {
		return ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			hold(ctx)
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "in-flight", "")
			return err
		})
	}},
	{"read-only callback", false, func(ms storage.MetaStore, hold func(context.Context)) error {
		return ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			hold(ctx)
			return nil
		})
	}},
	{"writable TransactionContext", true, func(ms storage.MetaStore, hold func(context.Context)) error {
		ctx, tx, err := ms.TransactionContext(context.Background(), true)
		if err != nil {
			return err
		}
		hold(ctx)
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "in-flight", ""); err != nil {
			_ = tx.Rollback()
			return err
		}
		return tx.Commit()
	}},
	{"read-only TransactionContext", false, func(ms storage.MetaStore, hold func(context.Context)) error {
		ctx, tx, err := ms.TransactionContext(context.Background(), false)
		if err != nil {
			return err
		}
		hold(ctx)
		return tx.Rollback()
	}},
}

// lcFlight is one transaction in flight, held until released.
type lcFlight struct {
	in      chan struct{} // closed once the transaction has begun
	release func()        // lets it go on; idempotent
	done    chan struct{} // closed when run has returned
	err     error         // run's result, once done
	// nestedErr is the result of a read-only transaction the held one
	// starts, with its context, once released.
	nestedErr error
}

// lcStart starts run on ms and holds it in flight. It is released when the
// test ends at the latest, so that no goroutine outlives the test.
func lcStart(t *testing.T, ms storage.MetaStore, run func(storage.MetaStore, func(context.Context)) error) *lcFlight {
	f := &lcFlight{in: make(chan struct{}), done: make(chan struct{})}
	release := make(chan struct{})
	var once sync.Once
	f.release = func() { once.Do(func() { close(release) }) }
	t.Cleanup(func() {
		f.release()
		<-f.done
	})
	go func() {
		defer close(f.done)
		f.err = run(ms, func(ctx context.Context) {
			close(f.in)
			<-release
			f.nestedErr = ms.WithTransaction(ctx, false, func(ctx context.Context) error {
				_, err := storage.IDMap(ctx)
				return err
			})
		})
	}()
	return f
}

// lcWaitClosedToNewWork waits until ms refuses new transactions with
// ErrClosed: Close has begun.
func lcWaitClosedToNewWork(t *testing.T, ms storage.MetaStore) {
	t.Helper()
	within(t, hangBound, "a new transaction while Close waits", func() {
		for {
			_, tx, err := ms.TransactionContext(context.Background(), false)
			if err != nil {
				assert.ErrorIs(t, err, storage.ErrClosed)
				return
			}
			_ = tx.Rollback()
			time.Sleep(time.Millisecond)
		}
	})
}

// idMap reads the store's IDMap in a transaction of its own.
func idMap(ms storage.MetaStore) (ids map[string]string, err error) {
	err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		ids, err = storage.IDMap(ctx)
		return err
	})
	return ids, err
}

// lcNames lists the snapshot names of ms.
func lcNames(t *testing.T, ms storage.MetaStore) []string {
	t.Helper()
	ids, err := idMap(ms)
	require.NoError(t, err)
	var names []string
	for _, name := range ids {
		names = append(names, name)
	}
	return names
}

// TestCloseWaitsForTransactionsInFlight: Close refuses new transactions at
// once, waits for those in flight (which may still start nested read-only
// ones), and releases the engine after them, so their commits are kept.
func TestCloseWaitsForTransactionsInFlight(t *testing.T) {
	for _, eng := range lcEngines {
		for _, fl := range lcFlights {
			t.Run(eng.name+"/"+fl.name, func(t *testing.T) {
				ms, reopen := eng.open(t)
				f := lcStart(t, ms, fl.run)
				within(t, hangBound, "start of the transaction", func() { <-f.in })

				closed := make(chan error, 1)
				go func() { closed <- ms.Close() }()
				lcWaitClosedToNewWork(t, ms)
				// A Close that does not wait has returned by now.
				time.Sleep(50 * time.Millisecond)
				select {
				case err := <-closed:
					t.Fatalf("Close returned %v while a transaction was in flight", err)
				default:
				}

				f.release()
				within(t, hangBound, "the transaction in flight", func() { <-f.done })
				assert.NoError(t, f.err, "the transaction in flight ends normally")
				assert.NoError(t, f.nestedErr, "a transaction in flight may start a nested read-only one")
				within(t, hangBound, "Close", func() { assert.NoError(t, <-closed) })

				ms2 := reopen()
				if fl.writable {
					assert.Equal(t, []string{"in-flight"}, lcNames(t, ms2), "the commit in flight is kept")
				} else {
					assert.Empty(t, lcNames(t, ms2))
				}
			})
		}
	}
}

// TestCloseDoesNotWaitForeverOnAStuckCallback: Close gives up after its
// bound with an Unavailable error; the store stays closed to new work, the
// stuck transaction may still finish, and a later Close releases the engine.
func TestCloseDoesNotWaitForeverOnAStuckCallback(t *testing.T) {
	const bound = 200 * time.Millisecond
	for _, eng := range lcEngines {
		for _, fl := range lcFlights {
			t.Run(eng.name+"/"+fl.name, func(t *testing.T) {
				ms, reopen := eng.open(t)
				storage.SetCloseTimeout(ms, bound)
				f := lcStart(t, ms, fl.run)
				within(t, hangBound, "start of the transaction", func() { <-f.in })

				var err error
				var took time.Duration
				within(t, hangBound, "Close with a stuck transaction", func() {
					start := time.Now()
					err = ms.Close()
					took = time.Since(start)
				})
				require.Error(t, err, "Close with a transaction still in flight")
				assert.True(t, errdefs.IsUnavailable(err), "class of %v", err)
				assert.GreaterOrEqual(t, took, bound, "Close waited its bound")
				_, _, err = ms.TransactionContext(context.Background(), false)
				assert.ErrorIs(t, err, storage.ErrClosed, "closed to new work")

				f.release()
				within(t, hangBound, "the stuck transaction, released", func() { <-f.done })
				assert.NoError(t, f.err, "the stuck transaction ends normally once released")
				assert.NoError(t, f.nestedErr)
				within(t, hangBound, "the second Close", func() { assert.NoError(t, ms.Close()) })

				ms2 := reopen()
				if fl.writable {
					assert.Equal(t, []string{"in-flight"}, lcNames(t, ms2))
				} else {
					assert.Empty(t, lcNames(t, ms2))
				}
			})
		}
	}
}

// TestCallbackThatExitsItsGoroutineEndsItsTransaction: a callback that
// calls runtime.Goexit outside a group commit (read-only, or any on etcd)
// leaves no transaction open: a leaked bbolt reader would block a writer
// that grows the file, and Close.
func TestCallbackThatExitsItsGoroutineEndsItsTransaction(t *testing.T) {
	for _, eng := range lcEngines {
		for _, writable := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/writable=%v", eng.name, writable), func(t *testing.T) {
				ms, _ := eng.open(t)
				exited := make(chan struct{})
				go func() {
					defer close(exited)
					_ = ms.WithTransaction(context.Background(), writable, func(ctx context.Context) error {
						if writable {
							if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "exiter", ""); err != nil {
								return err
							}
						}
						runtime.Goexit()
						return nil
					})
					t.Error("WithTransaction returned to a callback that called runtime.Goexit")
				}()
				<-exited

				// Enough labels that the file, and bbolt's map of it, grows.
				big := map[string]string{"fill": strings.Repeat("x", 4000)}
				within(t, hangBound, "writes that grow the file", func() {
					for i := range 64 {
						assert.NoError(t, ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
							_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprint("grow-", i), "", snapshots.WithLabels(big))
							return err
						}))
					}
				})
				assert.NotContains(t, lcNames(t, ms), "exiter")
				within(t, hangBound, "Close", func() { assert.NoError(t, ms.Close()) })
			})
		}
	}
}
