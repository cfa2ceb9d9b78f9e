import type { Export, ExportCatalog } from '../nbd/export.js';

/** The agent's exports: one per device, changing as devices come and go. */
export class DynamicCatalog implements ExportCatalog {
  private readonly byName = new Map<string, Export>();

  list(): Iterable<Export> {
    return this.byName.values();
  }

  lookup(name: string): Export | undefined {
    return this.byName.get(name);
  }

  set(exp: Export): void {
    this.byName.set(exp.name, exp);
  }

  delete(name: string): void {
    this.byName.delete(name);
  }
}
