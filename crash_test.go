//go:build unix

package storage_test

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/crashload"
)

// Crash consistency of the bbolt engine, proved the way bbolt and etcd prove
// theirs: a child process (this test binary, re-executed) writes at random
// and is killed with SIGKILL at a random moment; the parent reopens the file
// and checks that every transaction the child saw acknowledged is there,
// and that every other transaction is there entirely or not at all, and
// that storage.Check finds nothing. The workload and the judge are
// internal/crashload's (its package doc says how).
//
// A SIGKILL does not lose the page cache, so this proves atomicity,
// acknowledgement only after the commit is written, and recovery of a file
// whose writer died at any point; it cannot tell a missing fsync from a
// present one: that is TestBoltPowerCut's (package powercut).

const (
	// crashChildEnv holds the directory of the database; set, it makes
	// TestBoltCrashChild run.
	crashChildEnv = "SNAPMETA_CRASH_CHILD"
	// crashCycleEnv and crashSeedEnv pass the cycle number (which keeps
	// names and transaction IDs unique across cycles) and a random seed.
	crashCycleEnv = "SNAPMETA_CRASH_CYCLE"
	crashSeedEnv  = "SNAPMETA_CRASH_SEED"
	// crashCyclesEnv overrides how many kills TestBoltCrashConsistency
	// does; SNAPMETA_CRASH_SEED, given to the parent, replays its choices
	// (not the kill timing, which the scheduler decides).
	crashCyclesEnv     = "SNAPMETA_CRASH_CYCLES"
	crashDefaultCycles = 50

	crashDBFile = "metadata.db"
)

// TestBoltCrashChild is the child half of TestBoltCrashConsistency: it
// writes random transactions until it is killed.
func TestBoltCrashChild(t *testing.T) {
	dir := os.Getenv(crashChildEnv)
	if dir == "" {
		t.Skip("the child half of TestBoltCrashConsistency, which re-executes the test binary with " + crashChildEnv + " set; nothing to do alone")
	}
	cycle, err := strconv.Atoi(os.Getenv(crashCycleEnv))
	require.NoError(t, err, crashCycleEnv)
	seed, err := strconv.ParseUint(os.Getenv(crashSeedEnv), 10, 64)
	require.NoError(t, err, crashSeedEnv)

	ms, err := storage.NewBoltMetaStore(filepath.Join(dir, crashDBFile))
	require.NoError(t, err)
	defer func() { assert.NoError(t, ms.Close()) }()
	crashload.Write(t, ms, dir, cycle, seed)
}

func TestBoltCrashConsistency(t *testing.T) {
	cycles := crashDefaultCycles
	if v := os.Getenv(crashCyclesEnv); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, crashCyclesEnv)
		cycles = n
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(crashSeedEnv); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		require.NoError(t, err, crashSeedEnv)
		seed = n
	}
	t.Logf("%d cycles, %s=%d", cycles, crashSeedEnv, seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	dir := t.TempDir()
	began := time.Now()
	var (
		stats       crashload.Stats
		model       = map[string]*crashload.State{}
		offsets     = map[string]int64{}
		everAborted = map[string]bool{}
	)
	for cycle := range cycles {
		runFor := crashload.MinRun + time.Duration(rng.Int64N(int64(crashload.MaxRun-crashload.MinRun)+1))
		crashload.RunChild(t, "TestBoltCrashChild", []string{
			crashChildEnv + "=" + dir,
			crashCycleEnv + "=" + strconv.Itoa(cycle),
			crashSeedEnv + "=" + strconv.FormatUint(rng.Uint64(), 10),
		}, cycle, runFor, &stats)

		intents, torn := crashload.ReadLog(t, filepath.Join(dir, crashload.IntentsLog), offsets)
		stats.Torn += torn
		acks, torn := crashload.ReadLog(t, filepath.Join(dir, crashload.AckedLog), offsets)
		stats.Torn += torn

		start := time.Now()
		ms, err := storage.NewBoltMetaStore(filepath.Join(dir, crashDBFile))
		require.NoError(t, err, "cycle %d: reopening after the kill", cycle)
		problems, checkErr := storage.Check(context.Background(), ms)
		state, readErr := crashload.Read(context.Background(), ms)
		require.NoError(t, ms.Close())
		require.NoError(t, checkErr, "cycle %d: Check", cycle)
		if len(problems) > 0 {
			t.Fatalf("cycle %d (killed %v after ready): Check found problems after the kill (database and logs kept in %s):\n%v", cycle, runFor, crashload.Keep(t, dir), problems)
		}
		require.NoError(t, readErr, "cycle %d: reading the store", cycle)

		if v := crashload.Verify(cycle, model, intents, acks, state, everAborted, &stats); !v.OK() {
			t.Fatalf("cycle %d (killed %v after ready): the store after the kill does not match the transactions (database and logs kept in %s):\n%s", cycle, runFor, crashload.Keep(t, dir), strings.Join(v.Problems, "\n"))
		}
		model = state
		stats.MaxSnaps = max(stats.MaxSnaps, len(state))
		stats.Verifying += time.Since(start)
	}
	assert.GreaterOrEqual(t, stats.Acked, cycles, "too few acknowledged transactions to prove anything")
	t.Logf("%d kill cycles in %v: %d acknowledged transactions, all present; %d in flight at a kill and visible entirely (committed, unacknowledged), %d in flight and not visible at all; %d failed on purpose, none visible; %d torn log lines; up to %d snapshots; child startup %v, writing %v, verification %v in all",
		cycles, time.Since(began).Round(time.Millisecond), stats.Acked, stats.Extra, stats.Lost, stats.Aborted, stats.Torn, stats.MaxSnaps,
		stats.Startup.Round(time.Millisecond), stats.Running.Round(time.Millisecond), stats.Verifying.Round(time.Millisecond))
}
