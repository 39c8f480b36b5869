//go:build linux

package powercut_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/crashload"
	"github.com/snapmeta/storage/internal/lossyfs"
)

// Durability of the bbolt engine under power loss. A child process (this
// test binary, re-executed) writes internal/crashload's workload (group
// commit through concurrent WithTransaction, and plain TransactionContext
// transactions) to a store on a lossy filesystem, logging each transaction
// before it starts and each acknowledged one after Commit returned nil, on
// the real disk (fsynced). The parent kills it with SIGKILL at a random
// moment, then cuts power: it unmounts the filesystem and drops every write
// and directory change not made durable, in half the cycles keeping a
// random prefix of the last write (a torn write, such as a half-written
// meta page). It opens what is left, runs storage.Check, and demands that
// every acknowledged transaction is there and every other one entirely or
// not at all (crashload.Verify). Unlike a SIGKILL alone, this fails if a
// commit is acknowledged before it is fsynced: TestBoltPowerCutControl
// shows that it does, on a store opened with bbolt's NoSync.

const (
	// cutChildEnv holds the directory of the database (the mountpoint);
	// set, it makes TestBoltPowerCutChild run. cutLogEnv holds the
	// directory of the logs, on the real disk.
	cutChildEnv = "SNAPMETA_POWERCUT_CHILD"
	cutLogEnv   = "SNAPMETA_POWERCUT_LOGS"
	cutCycleEnv = "SNAPMETA_POWERCUT_CYCLE"
	cutNoSync   = "SNAPMETA_POWERCUT_NOSYNC"
	// cutSeedEnv seeds the child; given to the parent, it replays the
	// parent's choices (not the kill timing, which the scheduler decides).
	cutSeedEnv = "SNAPMETA_POWERCUT_SEED"
	// cutCyclesEnv overrides how many power cuts TestBoltPowerCut does.
	cutCyclesEnv     = "SNAPMETA_POWERCUT_CYCLES"
	cutDefaultCycles = 50
	// cutControlCycles is within how many cycles the harness must notice
	// that a NoSync store loses acknowledged commits.
	cutControlCycles = 5

	cutDBFile = "metadata.db"
)

// TestBoltPowerCutChild is the child half of the power-cut tests: it
// writes random transactions until it is killed.
func TestBoltPowerCutChild(t *testing.T) {
	dir := os.Getenv(cutChildEnv)
	if dir == "" {
		t.Skip("the child half of TestBoltPowerCut, which re-executes the test binary with " + cutChildEnv + " set; nothing to do alone")
	}
	cycle, err := strconv.Atoi(os.Getenv(cutCycleEnv))
	require.NoError(t, err, cutCycleEnv)
	seed, err := strconv.ParseUint(os.Getenv(cutSeedEnv), 10, 64)
	require.NoError(t, err, cutSeedEnv)
	var opts []storage.BoltOpt
	if os.Getenv(cutNoSync) != "" {
		opts = append(opts, func(o *bolt.Options) error {
			// NoGrowSync too: growing the file would otherwise fsync it,
			// making earlier commits durable by accident.
			o.NoSync, o.NoGrowSync = true, true
			return nil
		})
	}
	ms, err := storage.NewBoltMetaStore(filepath.Join(dir, cutDBFile), opts...)
	require.NoError(t, err)
	defer func() { assert.NoError(t, ms.Close()) }()
	crashload.Write(t, ms, os.Getenv(cutLogEnv), cycle, seed)
}

// cutRun is what a run of the harness saw.
type cutRun struct {
	cycles     int // cycles completed (the failing one included)
	stats      crashload.Stats
	fs         lossyfs.Stats
	cutsLosing int // cuts that dropped at least one write
	// failure describes the first cycle whose store was wrong (empty: none);
	// lost counts the names whose acknowledged state it lacked.
	failure string
	lost    int
}

// runBoltPowerCut runs cycles of write, kill, cut and verify, and stops at
// the first cycle that finds the store wrong: that is reported, not failed
// on t (the control expects it). A broken harness fails t.
func runBoltPowerCut(t *testing.T, cycles int, noSync, tear bool) cutRun {
	lossyfs.SkipUnlessAvailable(t)
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(cutSeedEnv); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		require.NoError(t, err, cutSeedEnv)
		seed = n
	}
	t.Logf("%d cycles, %s=%d", cycles, cutSeedEnv, seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	l, err := lossyfs.New(t.TempDir())
	require.NoError(t, err)
	mnt, logs := t.TempDir(), t.TempDir()
	mounted := false
	t.Cleanup(func() {
		if mounted {
			assert.NoError(t, l.Unmount())
		}
	})
	mount := func() {
		require.NoError(t, l.Mount(mnt))
		mounted = true
	}
	unmount := func() {
		mounted = false
		require.NoError(t, l.Unmount())
	}

	// The first child creates the store through the mount: the power cuts
	// also prove that a new file's name is made durable (NewBoltMetaStore
	// fsyncs its directory; bbolt alone does not, see docs/notes.md).

	var (
		run         cutRun
		model       = map[string]*crashload.State{}
		offsets     = map[string]int64{}
		everAborted = map[string]bool{}
	)
	env := func(cycle int) []string {
		e := []string{
			cutChildEnv + "=" + mnt,
			cutLogEnv + "=" + logs,
			cutCycleEnv + "=" + strconv.Itoa(cycle),
			cutSeedEnv + "=" + strconv.FormatUint(rng.Uint64(), 10),
		}
		if noSync {
			e = append(e, cutNoSync+"=1")
		}
		return e
	}
	for cycle := range cycles {
		run.cycles = cycle + 1
		runFor := crashload.MinRun + time.Duration(rng.Int64N(int64(crashload.MaxRun-crashload.MinRun)+1))
		mount()
		crashload.RunChild(t, "TestBoltPowerCutChild", env(cycle), cycle, runFor, &run.stats)
		unmount()

		var keep func(int) int
		if tear && rng.IntN(2) == 0 {
			keep = func(n int) int { return rng.IntN(n + 1) }
		}
		cut, err := l.Cut(keep)
		require.NoError(t, err, "cycle %d: the cut", cycle)
		if cut.DroppedWrites > 0 {
			run.cutsLosing++
		}

		intents, torn := crashload.ReadLog(t, filepath.Join(logs, crashload.IntentsLog), offsets)
		run.stats.Torn += torn
		acks, torn := crashload.ReadLog(t, filepath.Join(logs, crashload.AckedLog), offsets)
		run.stats.Torn += torn

		start := time.Now()
		what := fmt.Sprintf("cycle %d (killed %v after ready; the cut dropped %d writes, %d bytes, %d directory changes; torn: %v, %d bytes kept)",
			cycle, runFor, cut.DroppedWrites, cut.DroppedBytes, cut.DroppedDirOps, cut.Torn, cut.TornKept)
		// What survived is read on the disk itself, not through the mount.
		ms, err := storage.NewBoltMetaStore(filepath.Join(l.Backing(), cutDBFile))
		if err != nil {
			run.failure = fmt.Sprintf("%s: the store does not open after the cut: %v", what, err)
			break
		}
		problems, checkErr := storage.Check(context.Background(), ms)
		state, readErr := crashload.Read(context.Background(), ms)
		require.NoError(t, ms.Close())
		if checkErr != nil || len(problems) > 0 || readErr != nil {
			run.failure = fmt.Sprintf("%s: Check after the cut: %v %v; reading: %v", what, checkErr, problems, readErr)
			break
		}
		v := crashload.Verify(cycle, model, intents, acks, state, everAborted, &run.stats)
		run.stats.Verifying += time.Since(start)
		if !v.OK() {
			run.failure = fmt.Sprintf("%s: the store does not match the transactions:\n%s", what, strings.Join(v.Problems, "\n"))
			run.lost = v.Lost
			break
		}
		model = state
		run.stats.MaxSnaps = max(run.stats.MaxSnaps, len(state))
	}
	run.fs = l.Stats()
	return run
}

func TestBoltPowerCut(t *testing.T) {
	cycles := cutDefaultCycles
	if v := os.Getenv(cutCyclesEnv); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, cutCyclesEnv)
		cycles = n
	}
	began := time.Now()
	run := runBoltPowerCut(t, cycles, false, true)
	require.Empty(t, run.failure, "power cut broke the store")
	s, f := run.stats, run.fs
	assert.GreaterOrEqual(t, s.Acked, cycles, "too few acknowledged transactions to prove anything")
	// A kill between two commits leaves nothing unsynced; most cycles
	// should still catch a commit in flight.
	assert.GreaterOrEqual(t, run.cutsLosing, cycles/5, "too few cuts lost anything: the test would prove little")
	t.Logf("%d power cuts in %v: %d acknowledged transactions, all present; %d in flight at a cut and visible entirely, %d in flight and not visible at all; %d failed on purpose, none visible; up to %d snapshots",
		cycles, time.Since(began).Round(time.Millisecond), s.Acked, s.Extra, s.Lost, s.Aborted, s.MaxSnaps)
	t.Logf("the filesystem saw %d writes, %d fsyncs, %d directory fsyncs; the cuts dropped %d unsynced writes (%d bytes) and %d directory changes, in %d of %d cuts; %d last writes torn (%d bytes kept)",
		f.Writes, f.Fsyncs, f.DirFsyncs, f.DroppedWrites, f.DroppedBytes, f.DroppedDirOps, run.cutsLosing, cycles, f.TornWrites, f.TornBytes)
	t.Logf("child startup %v, writing %v, verification %v in all",
		s.Startup.Round(time.Millisecond), s.Running.Round(time.Millisecond), s.Verifying.Round(time.Millisecond))
}

// TestBoltPowerCutControl runs the harness on a store opened with bbolt's
// NoSync (and NoGrowSync): commits are acknowledged without fsync, and the
// harness must report acknowledged commits lost. A harness that cannot
// fail proves nothing.
func TestBoltPowerCutControl(t *testing.T) {
	run := runBoltPowerCut(t, cutControlCycles, true, false)
	require.NotEmpty(t, run.failure, "in %d cycles (%d acknowledged transactions, %d unsynced writes dropped), the harness did not notice that a NoSync store loses acknowledged commits",
		run.cycles, run.stats.Acked, run.fs.DroppedWrites)
	assert.Positive(t, run.lost, "the harness failed, but not on lost acknowledged commits: %s", run.failure)
	first, _, _ := strings.Cut(run.failure, "\n")
	t.Logf("as it must, the harness detected the loss in cycle %d of %d (%d names lacking their acknowledged state): %s", run.cycles, cutControlCycles, run.lost, first)
}
