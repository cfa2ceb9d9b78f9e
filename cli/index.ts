import { main } from './main.js';

// Output piped into a reader that stops early (`ballast … | head`): end quietly, as
// other command-line tools do, instead of an unhandled EPIPE.
for (const s of [process.stdout, process.stderr]) {
  s.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(0);
    throw e;
  });
}

await main(process.argv);
